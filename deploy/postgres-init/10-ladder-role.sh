#!/bin/bash
# The role and database the service uses; docker-compose.yml mounts this directory at
# /docker-entrypoint-initdb.d, and the postgres image runs it once, when its volume is first created
# (as the postgres user, against a server listening only on its socket).
#
# The role "ladder" logs in with the password in LADDER_DB_PASSWORD_FILE. It is not a superuser and
# cannot create roles or databases; it owns the database "ladder", so it runs the migrations and owns
# the tables there, and can do nothing outside it. The superuser (POSTGRES_USER, "postgres") is for
# administration only. LADDER_DB_USER and LADDER_DB_NAME change the names.
set -eo pipefail
: "${LADDER_DB_PASSWORD_FILE:?set LADDER_DB_PASSWORD_FILE to the file with the password of the role}"
[[ -s $LADDER_DB_PASSWORD_FILE ]] || { echo "10-ladder-role.sh: $LADDER_DB_PASSWORD_FILE is missing or empty" >&2; exit 1; }
# The password goes through psql's \set with a backquoted command, never onto a command line.
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" --dbname postgres \
     -v role="${LADDER_DB_USER:-ladder}" -v db="${LADDER_DB_NAME:-ladder}" <<'SQL'
\set password `tr -d '\r\n' < "$LADDER_DB_PASSWORD_FILE"`
CREATE ROLE :"role" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD :'password';
CREATE DATABASE :"db" OWNER :"role";
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
SQL
