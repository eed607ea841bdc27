-- Derived views, created by recorder.catalog after the table views (statements end with ";").

-- One row per stream session: its last state (closed_at is NULL while it is open).
CREATE OR REPLACE VIEW sessions AS
SELECT session, run, endpoint, contracts, opened_at, closed_at, close_code, reason, frames, stale
FROM session_log
QUALIFY row_number() OVER (PARTITION BY session ORDER BY seq DESC) = 1;

-- Every period in which a subscribed contract was not being received, with the reason:
--   disconnect  the stream was lost or closed by the server
--   stale       the no-data watchdog closed a silent stream
--   restart     the recorder itself was down (stopped, or crashed)
--   rejected    the server refused the contract
-- gap_end is NULL for a gap that is still open. A backtest joins this to know where history
-- is incomplete.
CREATE OR REPLACE VIEW gaps AS
WITH covered AS (
    -- a stream refused right after its accept (1008, no frame) never carried anything
    SELECT unnest(contracts) AS contract, session, opened_at,
           coalesce(closed_at, 'infinity'::TIMESTAMPTZ) AS until, reason AS closed_for, stale
    FROM sessions
    WHERE NOT (close_code IS NOT DISTINCT FROM 1008 AND frames = 0)
),
ordered AS (
    SELECT contract, opened_at,
           max(until) OVER before AS covered_until,
           arg_max(closed_for, until) OVER before AS closed_for,
           arg_max(stale, until) OVER before AS stale
    FROM covered
    WINDOW before AS (PARTITION BY contract ORDER BY opened_at, session
                      ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
),
ended AS (
    SELECT contract, covered_until AS gap_start, opened_at AS gap_end, closed_for, stale
    FROM ordered WHERE opened_at > covered_until
    UNION ALL
    SELECT contract, max(until), NULL, arg_max(closed_for, until), arg_max(stale, until)
    FROM covered GROUP BY contract HAVING max(until) < 'infinity'::TIMESTAMPTZ
),
classified AS (
    SELECT e.contract, e.gap_start, e.gap_end,
           CASE WHEN EXISTS (SELECT 1 FROM rejections r
                             WHERE r.contract = e.contract AND r.received_at >= e.gap_start
                               AND (e.gap_end IS NULL OR r.received_at < e.gap_end))
                     THEN 'rejected'
                WHEN e.closed_for IN ('shutdown', 'crash') THEN 'restart'
                WHEN e.stale THEN 'stale'
                ELSE 'disconnect' END AS reason
    FROM ended e
),
never_covered AS (
    -- refused before any session carried the contract
    SELECT r.contract, min(r.received_at) AS gap_start,
           (SELECT min(c.opened_at) FROM covered c WHERE c.contract = r.contract) AS gap_end,
           'rejected' AS reason
    FROM rejections r
    WHERE NOT EXISTS (SELECT 1 FROM covered c
                      WHERE c.contract = r.contract AND c.opened_at <= r.received_at)
    GROUP BY r.contract
)
SELECT contract, gap_start, gap_end, reason FROM classified
UNION ALL
SELECT contract, gap_start, gap_end, reason FROM never_covered;
