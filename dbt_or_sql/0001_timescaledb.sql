-- TimescaleDB must be in shared_preload_libraries (nadi services up writes that).
CREATE EXTENSION IF NOT EXISTS timescaledb;
