-- Least privilege (issue 10): one database role per process, the owner (whoever runs the
-- migrations, NADI_PG_DSN) keeps the schema.
--
--   nadi_ingest  the processor: writes ticks, gaps, staging (session temp tables), dirty
--                marks and ingest_state (through nadi_ingest_staged); reads what the worker
--                reads (candle_mode, instruments, nadi_instance, ingest_state).
--   nadi_api     REST and WebSocket, `nadi replay`: reads only (every transaction read-only
--                by default).
--   nadi_maint   Dagster maintenance and repairs, the instrument master load: writes derived
--                data (candles, marks, reconciliations, gap repairs) and instruments;
--                owner-only TimescaleDB operations go through the SECURITY DEFINER functions
--                nadi_maint_* below. The continuous aggregates (Timescale license) are owned
--                by nadi_maint: their refresh cannot run inside a function, and the jobs of
--                their refresh policies run as their owner, which must be able to log in.
--
-- Roles are cluster-wide and several databases (tests, editions) share them, so creation is
-- guarded and idempotent; grants are per database. LOGIN without a password: local trust;
-- give them passwords (ALTER ROLE ... PASSWORD) and set NADI_PG_*_DSN in production.
-- Every table, view, sequence and function of schema public gets an explicit decision here;
-- tests/test_roles.py holds the same matrix and fails on any object without one.

-- Cluster-wide state (roles, their attributes and memberships) is changed only when it
-- differs, so that after the first run, migrations of many databases at once touch no shared
-- catalog row; the first runs may race each other, which the handlers absorb.
DO $roles$
DECLARE
    r text;
    login boolean;
BEGIN
    FOREACH r IN ARRAY ARRAY['nadi_ingest', 'nadi_api', 'nadi_maint'] LOOP
        login := true;
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I %s', r, CASE WHEN login THEN 'LOGIN' ELSE 'NOLOGIN' END);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created meanwhile by a migration of another database
            END;
        END IF;
        -- Whatever an earlier run or an operator left, none of them is privileged.
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r
                   AND (rolsuper OR rolcreatedb OR rolcreaterole OR rolreplication
                        OR rolbypassrls OR rolcanlogin <> login)) THEN
            EXECUTE format(
                'ALTER ROLE %I NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS %s',
                r, CASE WHEN login THEN 'LOGIN' ELSE 'NOLOGIN' END);
        END IF;
    END LOOP;

    -- A read-only role stays read-only even if a query tries otherwise (defence in depth).
    IF NOT EXISTS (SELECT 1 FROM pg_db_role_setting s JOIN pg_roles o ON o.oid = s.setrole
                   WHERE o.rolname = 'nadi_api' AND s.setdatabase = 0
                     AND 'default_transaction_read_only=on' = ANY(s.setconfig)) THEN
        BEGIN
            ALTER ROLE nadi_api SET default_transaction_read_only = on;
        EXCEPTION WHEN unique_violation OR internal_error THEN
            NULL;  -- set meanwhile by another database's migration
        END;
    END IF;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO nadi_ingest, nadi_api, nadi_maint',
                   current_database());
    -- Session temp tables: the tick writer's staging (ingest, and repairs in maint).
    EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO nadi_ingest, nadi_maint',
                   current_database());
END
$roles$;

-- Nobody but the owner creates objects (PostgreSQL 15 default; stated for older templates).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO nadi_ingest, nadi_api, nadi_maint;

-- Tables. A later migration that adds a table must add its grants (and the test's matrix).
DO $tables$
DECLARE
    g record;
BEGIN
    FOR g IN
        SELECT * FROM (VALUES
            -- table                privileges                          roles
            ('ticks',              'SELECT, INSERT',                    'nadi_ingest, nadi_maint'),
            ('ticks',              'SELECT',                            'nadi_api'),
            ('sequence_gaps',      'SELECT, INSERT, UPDATE',            'nadi_ingest, nadi_maint'),
            ('sequence_gaps',      'SELECT',                            'nadi_api'),
            ('candle_dirty',       'SELECT, INSERT, UPDATE',            'nadi_ingest'),
            ('candle_dirty',       'SELECT, INSERT, UPDATE, DELETE',    'nadi_maint'),
            ('candle_dirty',       'SELECT',                            'nadi_api'),
            ('candle_mode',        'SELECT',                            'nadi_ingest, nadi_api, nadi_maint'),
            ('instruments',        'SELECT',                            'nadi_ingest, nadi_api'),
            ('instruments',        'SELECT, INSERT, UPDATE',            'nadi_maint'),
            -- 0010: the database's identity (Redis key prefix) and the per-day sequence state,
            -- advanced by nadi_ingest_staged (the worker; gap repairs in maint).
            ('nadi_instance',      'SELECT',                            'nadi_ingest, nadi_api, nadi_maint'),
            ('ingest_state',       'SELECT, INSERT, UPDATE',            'nadi_ingest, nadi_maint'),
            ('eod_reconciliation', 'SELECT, INSERT, UPDATE, DELETE',    'nadi_maint'),
            ('eod_reconciliation', 'SELECT',                            'nadi_api'),
            ('schema_migrations',  'SELECT',                            'nadi_maint')
        ) AS v(tbl, privs, roles)
    LOOP
        IF to_regclass('public.' || g.tbl) IS NOT NULL THEN
            EXECUTE format('GRANT %s ON public.%I TO %s', g.privs, g.tbl, g.roles);
        END IF;
    END LOOP;
    -- The candle tables: rollup hypertables (Apache edition), written by the refresh that
    -- Dagster runs; or continuous aggregates (Timescale license), handed to nadi_maint below.
    FOR g IN SELECT unnest(ARRAY['candles_1m', 'candles_5m']) AS tbl LOOP
        CONTINUE WHEN to_regclass('public.' || g.tbl) IS NULL;
        EXECUTE format('GRANT SELECT ON public.%I TO nadi_api, nadi_maint', g.tbl);
        IF EXISTS (SELECT 1 FROM pg_class WHERE oid = to_regclass('public.' || g.tbl)
                   AND relkind = 'r') THEN
            EXECUTE format('GRANT INSERT, UPDATE, DELETE ON public.%I TO nadi_maint', g.tbl);
        END IF;
    END LOOP;
END
$tables$;

GRANT USAGE ON SEQUENCE sequence_gaps_id_seq TO nadi_ingest, nadi_maint;

-- Continuous aggregates (Timescale license only): refresh_continuous_aggregate must run as
-- the aggregate's owner and outside any function, so no SECURITY DEFINER wrapper can do it;
-- and TimescaleDB runs a refresh policy's job as the aggregate's owner, which must have
-- LOGIN. The owner is nadi_maint: it may refresh or even drop derived candles, which a
-- refresh rebuilds from ticks (it reads ticks), and nothing else. A later migration that
-- recreates an aggregate must hand it over again.
DO $caggs$
DECLARE
    v record;
BEGIN
    IF to_regclass('timescaledb_information.continuous_aggregates') IS NULL THEN
        RETURN;
    END IF;
    FOR v IN
        SELECT format('%I.%I', view_schema, view_name) AS name
        FROM timescaledb_information.continuous_aggregates
        WHERE view_schema = 'public'
        ORDER BY view_name  -- candles_1m first: candles_5m is built on it
    LOOP
        IF NOT pg_has_role(current_user, 'nadi_maint', 'MEMBER') THEN
            -- ALTER ... OWNER TO needs membership in the new owner (superusers have it).
            EXECUTE format('GRANT nadi_maint TO %I', current_user);
        END IF;
        EXECUTE format('ALTER MATERIALIZED VIEW %s OWNER TO nadi_maint', v.name);
    END LOOP;
    -- Hierarchical aggregates read their base aggregate as their owner: the same role.
END
$caggs$;

-- Functions: EXECUTE is PUBLIC by default in PostgreSQL; ours are granted by name instead.
DO $functions$
DECLARE
    f record;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure AS sig
        FROM pg_proc p
        WHERE p.pronamespace = 'public'::regnamespace
          AND NOT EXISTS (SELECT 1 FROM pg_depend d
                          WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                            AND d.deptype = 'e')  -- TimescaleDB's own stay as they are
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f.sig);
    END LOOP;
END
$functions$;

DO $grants$
DECLARE
    g record;
BEGIN
    FOR g IN
        SELECT p.oid::regprocedure AS sig, v.roles
        FROM (VALUES
            -- function                     roles
            ('nadi_ingest_staged',          'nadi_ingest, nadi_maint'),  -- writer; repairs
            ('nadi_refresh_candles',        'nadi_maint'),
            -- The one candle definition (0011), read by the API's raw tail and the checks.
            ('nadi_candles',                'nadi_api, nadi_maint'),
            ('nadi_candle_aggregates',      'nadi_api, nadi_maint'),
            ('nadi_candle_rollup_aggregates', 'nadi_api, nadi_maint'),
            ('nadi_candle_dirty_stamp',     'nadi_ingest, nadi_maint'),  -- trigger on marks
            ('nadi_forget_refreshed_marks', 'nadi_maint')
        ) AS v(name, roles)
        JOIN pg_proc p ON p.proname = v.name AND p.pronamespace = 'public'::regnamespace
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', g.sig, g.roles);
    END LOOP;
END
$grants$;

-- Owner-only TimescaleDB operations for nadi_maint. Each: SECURITY DEFINER (runs as the
-- owner), search_path pinned to pg_catalog and public (pg_temp last, so a caller's temp
-- objects never shadow ours), arguments checked against what maintenance needs.

-- Is rel one of our hypertables (schema public)?
CREATE OR REPLACE FUNCTION nadi_maint_check_hypertable(p_rel regclass) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM timescaledb_information.hypertables h
                   WHERE format('%I.%I', h.hypertable_schema, h.hypertable_name)::regclass
                         = p_rel
                     AND h.hypertable_schema = 'public') THEN
        RAISE EXCEPTION 'nadi_maint: % is not a hypertable of schema public', p_rel
            USING ERRCODE = 'insufficient_privilege';
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION nadi_maint_set_chunk_interval(p_hypertable regclass,
                                                         p_interval interval)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    PERFORM nadi_maint_check_hypertable(p_hypertable);
    IF p_interval < INTERVAL '1 minute' OR p_interval > INTERVAL '366 days' THEN
        RAISE EXCEPTION 'nadi_maint: chunk interval % outside 1 minute .. 366 days', p_interval;
    END IF;
    PERFORM public.set_chunk_time_interval(p_hypertable, p_interval);
END;
$$;

-- Retention: drop chunks wholly older than now() - p_older_than (at least a day).
CREATE OR REPLACE FUNCTION nadi_maint_drop_chunks(p_hypertable regclass,
                                                  p_older_than interval)
RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    PERFORM nadi_maint_check_hypertable(p_hypertable);
    IF p_older_than IS NULL OR p_older_than < INTERVAL '1 day' THEN
        RAISE EXCEPTION 'nadi_maint: retention below one day (%) refused', p_older_than;
    END IF;
    RETURN QUERY
        SELECT c::text FROM public.drop_chunks(p_hypertable, older_than => now() - p_older_than) c;
END;
$$;

-- Planner statistics for one of our tables, or a chunk of one of our hypertables.
-- (VACUUM cannot run inside a function; autovacuum does it, tuned below for the churn.)
CREATE OR REPLACE FUNCTION nadi_maint_analyze(p_table regclass) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_class c
        WHERE c.oid = p_table AND c.relkind IN ('r', 'p')
          AND (c.relnamespace = 'public'::regnamespace
               OR EXISTS (SELECT 1 FROM timescaledb_information.chunks k
                          WHERE format('%I.%I', k.chunk_schema, k.chunk_name)::regclass = p_table
                            AND k.hypertable_schema = 'public'))) THEN
        RAISE EXCEPTION 'nadi_maint: % is not a table of schema public or one of its chunks',
            p_table USING ERRCODE = 'insufficient_privilege';
    END IF;
    EXECUTE format('ANALYZE %s', p_table);
END;
$$;

-- Retention as a TimescaleDB policy (Timescale license): p_keep NULL removes it.
CREATE OR REPLACE FUNCTION nadi_maint_set_retention(p_hypertable regclass, p_keep interval)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    PERFORM nadi_maint_check_hypertable(p_hypertable);
    IF p_keep IS NOT NULL AND p_keep < INTERVAL '1 day' THEN
        RAISE EXCEPTION 'nadi_maint: retention below one day (%) refused', p_keep;
    END IF;
    PERFORM public.remove_retention_policy(p_hypertable, if_exists => TRUE);
    IF p_keep IS NOT NULL THEN
        PERFORM public.add_retention_policy(p_hypertable, p_keep);
    END IF;
END;
$$;

-- Compression (Timescale license): segment by instrument (every read is per instrument),
-- order by time and sequence. Once enabled, a no-op.
CREATE OR REPLACE FUNCTION nadi_maint_enable_compression() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF NOT (SELECT compression_enabled FROM timescaledb_information.hypertables
            WHERE hypertable_schema = 'public' AND hypertable_name = 'ticks') THEN
        EXECUTE 'ALTER TABLE public.ticks SET (timescaledb.compress,'
                ' timescaledb.compress_segmentby = ''instrument_token'','
                ' timescaledb.compress_orderby = ''exchange_ts, sequence_id'')';
    END IF;
END;
$$;

-- The compression policy of ticks: compress chunks older than p_after (enabling compression
-- first); NULL removes the policy (compressed chunks stay).
CREATE OR REPLACE FUNCTION nadi_maint_set_compression(p_hypertable regclass,
                                                      p_after interval)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    PERFORM nadi_maint_check_hypertable(p_hypertable);
    IF p_hypertable <> 'public.ticks'::regclass THEN
        RAISE EXCEPTION 'nadi_maint: compression is configured for ticks only';
    END IF;
    IF p_after IS NOT NULL AND p_after < INTERVAL '1 day' THEN
        RAISE EXCEPTION 'nadi_maint: compressing chunks younger than a day (%) refused', p_after;
    END IF;
    PERFORM public.remove_compression_policy(p_hypertable, if_exists => TRUE);
    IF p_after IS NOT NULL THEN
        PERFORM nadi_maint_enable_compression();
        PERFORM public.add_compression_policy(p_hypertable, compress_after => p_after);
    END IF;
END;
$$;

-- Compress one chunk of ticks now (Dagster's compression asset picks chunks older than its
-- horizon; here only: a chunk of public.ticks that ended at least a day ago).
CREATE OR REPLACE FUNCTION nadi_maint_compress_chunk(p_chunk regclass) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM timescaledb_information.chunks k
                   WHERE format('%I.%I', k.chunk_schema, k.chunk_name)::regclass = p_chunk
                     AND k.hypertable_schema = 'public' AND k.hypertable_name = 'ticks'
                     AND k.range_end <= now() - INTERVAL '1 day') THEN
        RAISE EXCEPTION 'nadi_maint: % is not a chunk of ticks older than a day', p_chunk
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    PERFORM nadi_maint_enable_compression();
    PERFORM public.compress_chunk(p_chunk, if_not_compressed => TRUE);
END;
$$;

-- TimescaleDB's own jobs (job-history retention, telemetry: owned by the extension's
-- installer, not ours) scheduled or paused with the policies; returns how many changed.
CREATE OR REPLACE FUNCTION nadi_maint_schedule_builtin_jobs(p_scheduled boolean) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    n integer := 0;
    j record;
BEGIN
    IF p_scheduled IS NULL THEN
        RAISE EXCEPTION 'nadi_maint: scheduled must be true or false';
    END IF;
    FOR j IN SELECT job_id FROM timescaledb_information.jobs
             WHERE proc_schema = '_timescaledb_functions' AND hypertable_name IS NULL
               AND scheduled IS DISTINCT FROM p_scheduled LOOP
        PERFORM public.alter_job(j.job_id, scheduled => p_scheduled);
        n := n + 1;
    END LOOP;
    RETURN n;
END;
$$;

DO $maint$
DECLARE
    f text;
BEGIN
    REVOKE ALL ON FUNCTION nadi_maint_check_hypertable(regclass) FROM PUBLIC;  -- internal
    FOREACH f IN ARRAY ARRAY[
        'nadi_maint_set_chunk_interval(regclass, interval)',
        'nadi_maint_drop_chunks(regclass, interval)',
        'nadi_maint_analyze(regclass)',
        'nadi_maint_set_retention(regclass, interval)',
        'nadi_maint_set_compression(regclass, interval)',
        'nadi_maint_enable_compression()',
        'nadi_maint_compress_chunk(regclass)',
        'nadi_maint_schedule_builtin_jobs(boolean)'
    ] LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO nadi_maint', f);
    END LOOP;
END
$maint$;

-- candle_dirty churns (a row per touched window per batch, deleted by each refresh) and the
-- maintenance role cannot VACUUM it: let autovacuum visit it early.
ALTER TABLE candle_dirty SET (autovacuum_vacuum_scale_factor = 0.0,
                              autovacuum_vacuum_threshold = 5000,
                              autovacuum_analyze_scale_factor = 0.0,
                              autovacuum_analyze_threshold = 5000);
