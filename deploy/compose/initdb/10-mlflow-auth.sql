-- Run once by the postgres image, as POSTGRES_USER, when its data volume is first initialised
-- (files in /docker-entrypoint-initdb.d/). The image itself creates POSTGRES_DB (mlflow: runs,
-- experiments, registered models); this adds the second database, for MLflow's basic-auth users
-- and permissions (the database_uri of the auth config that entrypoint.py writes).
CREATE DATABASE mlflow_auth;
