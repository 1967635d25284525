#!/bin/sh
# One-shot (docker-compose.yml's minio-init, in the minio/mc image): creates the bucket and the
# service's own MinIO user, whose policy allows only that bucket's objects. The root credentials
# stay here and in minio. Safe to run again: the bucket is kept; the user's secret and policy are
# set again from the files. Reads /run/secrets/{minio_root_user,minio_root_password,
# s3_access_key_id,s3_secret_access_key} (MINIO_INIT_SECRETS names another folder, for tests).
# The bucket is the one in LADDER_ARTIFACTS_URL (s3://BUCKET/PREFIX), the same value the API and
# workers get, so that there is one name to change.
set -eu
url="${LADDER_ARTIFACTS_URL:?minio-init: set LADDER_ARTIFACTS_URL (s3://BUCKET/PREFIX), as for the api and worker}"
case $url in
    s3://*) ;;
    *) echo "minio-init: LADDER_ARTIFACTS_URL is $url, not s3://BUCKET/PREFIX; with another store, remove minio and minio-init from docker-compose.yml" >&2; exit 1 ;;
esac
bucket=${url#s3://}
bucket=${bucket%%/*}
# S3's rule for bucket names; it also keeps the name safe inside the policy's JSON below
case $bucket in
    *[!abcdefghijklmnopqrstuvwxyz0123456789.-]* | [.-]* | *[.-] | '') bad=1 ;;   # no ranges: locale-proof
    *) bad= ; [ ${#bucket} -ge 3 ] && [ ${#bucket} -le 63 ] || bad=1 ;;
esac
[ -z "$bad" ] || { echo "minio-init: bucket name \"$bucket\" (from LADDER_ARTIFACTS_URL) is not a valid S3 bucket name: 3 to 63 lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit" >&2; exit 1; }
secrets=${MINIO_INIT_SECRETS:-/run/secrets}

secret() {   # the content of $secrets/$1 (shell built-ins only: the mc image is minimal)
    v=
    IFS= read -r v < "$secrets/$1" || [ -n "$v" ] || { echo "minio-init: $secrets/$1 is missing or empty" >&2; exit 1; }
    printf '%s' "$v"
}

# one assignment each, so that set -e stops at a missing file
root_user=$(secret minio_root_user)
root_password=$(secret minio_root_password)
key=$(secret s3_access_key_id)
key_secret=$(secret s3_secret_access_key)
export MC_HOST_local="http://$root_user:$root_password@minio:9000"   # root credentials: not on a command line

mc mb --ignore-existing "local/$bucket"
policy() {
    printf '%s\n' '{"Version": "2012-10-17", "Statement": [' \
        "  {\"Effect\": \"Allow\", \"Action\": [\"s3:ListBucket\", \"s3:GetBucketLocation\", \"s3:ListBucketMultipartUploads\"], \"Resource\": [\"arn:aws:s3:::$bucket\"]}," \
        "  {\"Effect\": \"Allow\", \"Action\": [\"s3:GetObject\", \"s3:PutObject\", \"s3:DeleteObject\", \"s3:AbortMultipartUpload\", \"s3:ListMultipartUploadParts\"], \"Resource\": [\"arn:aws:s3:::$bucket/*\"]}" \
        ']}'
}
policy > /tmp/ladder-bucket.json
mc admin policy create local "$bucket-rw" /tmp/ladder-bucket.json
mc admin user add local "$key" "$key_secret"
if ! out=$(mc admin policy attach local "$bucket-rw" --user "$key" 2>&1); then
    case $out in
        *already*) ;;   # attached by an earlier run
        *) echo "$out" >&2; exit 1 ;;
    esac
fi
echo "minio-init: bucket $bucket, user $key (policy $bucket-rw)"
