"""Workers: the Celery app (one task per stage) and the embedded in-process worker, both running
`workers.runner.run_stage`."""
