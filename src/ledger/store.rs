//! The grant ledger in PostgreSQL: the only file with SQL. Each function is
//! one statement (or one transaction) that carries out a rule of `rules.rs`;
//! every write is idempotent by event id or notice id, so a retried commit,
//! a redelivered event or the sweeping replica beside the active one never
//! counts twice. Tables live in their own schema (the connection's
//! `search_path`), created and migrated at start under sqlx's migrator lock.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Row;

use super::rules::{Credit, Status};
use crate::metrics::Metrics;
use crate::settings::LedgerSettings;

/// How long a statement may wait for a pooled connection: a ledger that does
/// not answer is reported (and worked around, section 8.8) rather than waited for.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// The migrations, embedded in the binary. Each only adds (tables, columns
/// with defaults, indexes), so the previous release keeps working on a schema
/// a newer replica migrated.
const MIGRATIONS: &[(i64, &str, &str)] =
    &[(1, "ledger", include_str!("migrations/0001_ledger.sql"))];

/// Why a ledger statement failed, without the URL or the password (sqlx's
/// errors never carry the connection string; the text is kept short).
#[derive(Debug, Clone, thiserror::Error)]
#[error("the ledger (PostgreSQL) failed: {0}")]
pub struct LedgerError(pub String);

impl From<sqlx::Error> for LedgerError {
    fn from(e: sqlx::Error) -> Self {
        let text = match &e {
            sqlx::Error::PoolTimedOut => "no connection within 3 s (is PostgreSQL up?)".to_string(),
            sqlx::Error::Io(io) => format!("connection: {io}"),
            sqlx::Error::Database(db) => {
                format!("{} ({})", db.message(), db.code().unwrap_or_default())
            }
            other => other.to_string(),
        };
        LedgerError(text)
    }
}

impl From<sqlx::migrate::MigrateError> for LedgerError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        LedgerError(format!("migration: {e}"))
    }
}

pub type Result<T> = std::result::Result<T, LedgerError>;

/// What the ledger knows of one user for one template.
#[derive(Debug, Clone, Default)]
pub struct UserRow {
    pub credit: Credit,
    pub openid: Option<String>,
    /// Held events (claimed or not).
    pub held: u64,
    /// Since the last real call for a user held at an exact 0.
    pub since_probe: Duration,
}

/// One held event.
#[derive(Debug, Clone)]
pub struct HeldRow {
    pub event_id: String,
    pub body: Vec<u8>,
    pub reason: String,
    pub errcode: Option<i32>,
    pub held_at: DateTime<Utc>,
    pub claimed_by: Option<String>,
    pub traceparent: Option<String>,
    pub attempts: i32,
}

/// An event to hold: its id, original body, trace context and failed attempts.
#[derive(Debug, Clone)]
pub struct ToHold {
    pub event_id: String,
    pub body: Vec<u8>,
    pub traceparent: Option<String>,
    pub attempts: i32,
}

/// One notice's hold (see [`Store::hold`]). Besides the events, its
/// statement writes the openid the window carried and the spells whose
/// `notifier.notice_held` the broker confirmed since the last write, saving
/// statements of their own.
#[derive(Debug, Clone, Default)]
pub struct HoldArgs {
    pub user_id: String,
    /// The claim the notice made (`""`: none).
    pub notice_id: String,
    pub events: Vec<ToHold>,
    pub reason: &'static str,
    pub errcode: Option<i32>,
    /// Set the count to an exact 0 only at this version.
    pub guard_version: Option<i64>,
    pub openid: Option<String>,
    /// Spells whose `notifier.notice_held` the broker confirmed.
    pub confirmed: Vec<(String, String)>,
}

/// What a hold did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldDone {
    /// Written; `new_spell` when the user had nothing held before (the
    /// `notifier.notice_held` signal is due), `held`: how many are held now.
    Held {
        new_spell: bool,
        held: u64,
        oldest: DateTime<Utc>,
    },
    /// A credit was counted after the notice read the ledger: not held.
    CreditCounted,
}

/// What a subscription event did.
#[derive(Debug, Clone)]
pub struct Counted {
    /// Counted now (false: a redelivered event, counted before).
    pub counted: bool,
    pub credit: Credit,
    pub openid: Option<String>,
    pub held: u64,
}

/// What an accepted notice did to the ledger.
#[derive(Debug, Clone, Copy)]
pub struct Spent {
    /// The count after the decrement (`None`: the ledger has no count for
    /// the user, or the decrement was counted before).
    pub credit: Option<Credit>,
    pub released: u64,
}

/// A user with held events (`ledger held`, the sweep).
#[derive(Debug, Clone)]
pub struct HeldUser {
    pub user_id: String,
    pub template_id: String,
    pub held: u64,
    pub oldest: DateTime<Utc>,
    pub reason: String,
    pub credit: Credit,
    pub since_probe: Duration,
}

/// The pooled connection to the ledger and its statements.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    schema: String,
    metrics: Option<std::sync::Arc<Metrics>>,
}

/// Connection options from the URL, with the schema as the search path.
///
/// # Errors
/// The URL does not parse (the message names the variable, never the URL).
pub fn connect_options(s: &LedgerSettings) -> Result<PgConnectOptions> {
    let opts = PgConnectOptions::from_str(s.url.expose())
        .map_err(|_| LedgerError("NOTIFIER_LEDGER_URL is not a valid PostgreSQL URL".into()))?;
    Ok(opts
        // A statement that hangs (a PostgreSQL behind a black hole) is cut
        // after 10 s, so the lanes waiting on it go on (section 8.8).
        .options([
            ("search_path", s.schema.as_str()),
            ("statement_timeout", "10000"),
        ])
        .application_name("wechat-notifier"))
}

impl Store {
    /// A lazy pool: nothing is connected until the first statement, so a
    /// ledger that is down at start is reported, not fatal.
    ///
    /// # Errors
    /// The URL does not parse.
    pub fn connect(s: &LedgerSettings, metrics: Option<std::sync::Arc<Metrics>>) -> Result<Store> {
        let pool = PgPoolOptions::new()
            .max_connections(s.pool)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(connect_options(s)?);
        Ok(Store {
            pool,
            schema: s.schema.clone(),
            metrics,
        })
    }

    /// Times one statement (the ledger's statement-duration histogram).
    async fn timed<T>(&self, statement: impl std::future::Future<Output = T>) -> T {
        let started = Instant::now();
        let r = statement.await;
        if let Some(m) = &self.metrics {
            m.ledger_statement.observe(started.elapsed().as_secs_f64());
        }
        r
    }

    /// Creates the schema and runs the embedded migrations under the
    /// migrator's advisory lock (replicas starting together are safe).
    ///
    /// # Errors
    /// The ledger is unreachable or a migration fails.
    pub async fn migrate(&self) -> Result<()> {
        // Replicas starting together: `CREATE SCHEMA IF NOT EXISTS` is not
        // safe against itself, so it runs under an advisory lock. The schema
        // name was checked at start to be a plain identifier.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("wechat-notifier schema {}", self.schema))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", self.schema))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let migrations: Vec<Migration> = MIGRATIONS
            .iter()
            .map(|(version, description, sql)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*description),
                    MigrationType::Simple,
                    Cow::Borrowed(*sql),
                    false,
                )
            })
            .collect();
        let migrator = Migrator {
            migrations: Cow::Owned(migrations),
            ignore_missing: true,
            locking: true,
            no_tx: false,
        };
        migrator.run(&self.pool).await?;
        Ok(())
    }

    /// Drops the schema and everything in it (the demo's own, at its end).
    ///
    /// # Errors
    /// The ledger failed.
    pub async fn drop_schema(&self) -> Result<()> {
        sqlx::query(&format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            self.schema
        ))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Reaches the ledger and checks its tables exist, changing nothing
    /// (`check`, and readiness after an outage).
    ///
    /// # Errors
    /// Unreachable, or not migrated.
    pub async fn ping(&self) -> Result<()> {
        let statement = sqlx::query("SELECT count(*) FROM credits WHERE false").execute(&self.pool);
        self.timed(statement).await?;
        Ok(())
    }

    /// The user's count, openid and held events, in one statement.
    ///
    /// # Errors
    /// The ledger failed.
    pub async fn user(&self, user_id: &str, template_id: &str) -> Result<UserRow> {
        let mut rows = self.users(&[user_id.to_string()], template_id).await?;
        rows.pop()
            .ok_or_else(|| LedgerError("the user's row is missing".into()))
    }

    /// [`Store::user`] for many users in one statement, in their order.
    ///
    /// # Errors
    /// The ledger failed.
    pub async fn users(&self, user_ids: &[String], template_id: &str) -> Result<Vec<UserRow>> {
        let statement = sqlx::query(
            "SELECT c.count, c.exact, c.version,
                    EXTRACT(EPOCH FROM now() - c.probed_at)::float8 AS since_probe,
                    u.openid,
                    (SELECT count(*) FROM held h
                     WHERE h.user_id = q.user_id AND h.template_id = $2) AS held
             FROM unnest($1::text[]) WITH ORDINALITY AS q(user_id, i)
             LEFT JOIN credits c ON c.user_id = q.user_id AND c.template_id = $2
             LEFT JOIN users u ON u.user_id = q.user_id
             ORDER BY q.i",
        )
        .bind(user_ids)
        .bind(template_id)
        .fetch_all(&self.pool);
        let rows = self.timed(statement).await;
        rows?
            .iter()
            .map(|row| {
                let credit = match row.try_get::<Option<i32>, _>("count")? {
                    Some(count) => Credit {
                        count,
                        exact: row.try_get("exact")?,
                        version: row.try_get("version")?,
                    },
                    None => Credit::default(),
                };
                let since: Option<f64> = row.try_get("since_probe")?;
                Ok(UserRow {
                    credit,
                    openid: row.try_get("openid")?,
                    held: row.try_get::<i64, _>("held")?.max(0) as u64,
                    since_probe: Duration::from_secs_f64(since.unwrap_or(0.0).max(0.0)),
                })
            })
            .collect()
    }

    /// Which of `ids` the ledger holds or has settled (released, expired):
    /// a redelivered copy of such an event needs no notice of its own (a
    /// window's event written with a claim whose outcome a crash left
    /// unknown is sent again with that notice, and kept held if that notice
    /// does not go: see `unclaim`).
    ///
    /// # Errors
    /// The ledger failed.
    pub async fn known(&self, ids: &[String]) -> Result<Vec<String>> {
        let statement = sqlx::query(
            "SELECT event_id FROM held WHERE event_id = ANY($1)
             UNION SELECT event_id FROM settled WHERE event_id = ANY($1) AND kind <> 'subscription'",
        )
        .bind(ids)
        .fetch_all(&self.pool);
        let rows = self.timed(statement).await;
        Ok(rows?.iter().map(|r| r.get::<String, _>(0)).collect())
    }

    /// Remembers the openids assignment events carried, (user id, openid)
    /// pairs in one statement (a user's last pair wins).
    ///
    /// # Errors
    /// The ledger failed.
    pub async fn remember_openids(&self, pairs: &[(String, String)]) -> Result<Vec<()>> {
        let (users, openids): (Vec<&str>, Vec<&str>) =
            pairs.iter().map(|(u, o)| (u.as_str(), o.as_str())).unzip();
        let statement = sqlx::query(
            "INSERT INTO users (user_id, openid)
             SELECT DISTINCT ON (user_id) user_id, openid
             FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS q(user_id, openid, i)
             ORDER BY user_id, i DESC
             ON CONFLICT (user_id) DO UPDATE SET openid = excluded.openid, seen_at = now()",
        )
        .bind(&users)
        .bind(&openids)
        .execute(&self.pool);
        self.timed(statement).await?;
        Ok(vec![(); pairs.len()])
    }

    /// Claims the user's held events for a notice before its call, in one
    /// transaction: rows claimed by an earlier notice whose outcome is
    /// unknown (a crash) are returned apart, to be sent again with exactly
    /// their ids; the unclaimed ones, oldest first, are marked with the
    /// notice id `make_id` computes from them and `window` (whose events are
    /// written claimed too, so a crash after the call can repeat the notice
    /// only with the same ids).
    ///
    /// # Errors
    /// The ledger failed: nothing is claimed, unless the COMMIT's answer was
    /// lost (`commit_lost`: the claim may stand under that notice id).
    pub async fn claim(
        &self,
        user_id: &str,
        template_id: &str,
        window: &[ToHold],
        make_id: impl FnOnce(&[HeldRow]) -> String,
    ) -> std::result::Result<Claim, ClaimError> {
        self.timed(self.claim_tx(user_id, template_id, window, make_id))
            .await
    }

    async fn claim_tx(
        &self,
        user_id: &str,
        template_id: &str,
        window: &[ToHold],
        make_id: impl FnOnce(&[HeldRow]) -> String,
    ) -> std::result::Result<Claim, ClaimError> {
        let mut tx = self.pool.begin().await?;
        // Rows a sweep is dead-lettering are its own: left out (rechecked
        // under the lock, so a row the sweep marks meanwhile is left too).
        let rows = sqlx::query(
            "SELECT event_id, body, reason, errcode, held_at, claimed_by, traceparent, attempts
             FROM held WHERE user_id = $1 AND template_id = $2
               AND (claimed_by IS NULL OR claimed_by NOT LIKE 'sweep:%')
             ORDER BY held_at, seq FOR UPDATE",
        )
        .bind(user_id)
        .bind(template_id)
        .fetch_all(&mut *tx)
        .await?;
        let mut free = Vec::new();
        let mut stale: Vec<(String, Vec<HeldRow>)> = Vec::new();
        for r in rows {
            let row = held_row(&r)?;
            match row.claimed_by.clone() {
                None => free.push(row),
                Some(n) => match stale.iter_mut().find(|(id, _)| *id == n) {
                    Some((_, group)) => group.push(row),
                    None => stale.push((n, vec![row])),
                },
            }
        }
        let notice_id = make_id(&free);
        let ids: Vec<&str> = free.iter().map(|r| r.event_id.as_str()).collect();
        sqlx::query("UPDATE held SET claimed_by = $1 WHERE event_id = ANY($2)")
            .bind(&notice_id)
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        if !window.is_empty() {
            insert_held(
                &mut tx,
                user_id,
                template_id,
                window,
                "window",
                None,
                Some(&notice_id),
            )
            .await?;
        }
        // A COMMIT whose answer is lost (the connection dropped) may have
        // been carried out: the caller undoes it by the notice id.
        if let Err(e) = tx.commit().await {
            return Err(ClaimError {
                error: e.into(),
                commit_lost: Some(notice_id),
            });
        }
        Ok(Claim {
            notice_id,
            rows: free,
            stale,
        })
    }

    /// The notice `notice_id` was accepted: its decrement is counted once
    /// (keyed by the notice id), the events it claimed leave the ledger (kept
    /// as `released` ids), and a spell of holding ends when nothing is left.
    ///
    /// # Errors
    /// The ledger failed (the caller retries: the statement is idempotent).
    pub async fn accepted(
        &self,
        notice_id: &str,
        user_id: &str,
        template_id: &str,
    ) -> Result<Spent> {
        let mut spent = self
            .accepted_many(&[(notice_id.to_string(), user_id.to_string())], template_id)
            .await?;
        spent
            .pop()
            .ok_or_else(|| LedgerError("the notice's row is missing".into()))
    }

    /// [`Store::accepted`] for many (notice id, user id) in one statement,
    /// answered in their order. A user's notices in one batch all count.
    ///
    /// # Errors
    /// The ledger failed (the caller retries: the statement is idempotent).
    pub async fn accepted_many(
        &self,
        notices: &[(String, String)],
        template_id: &str,
    ) -> Result<Vec<Spent>> {
        let (ids, users): (Vec<&str>, Vec<&str>) = notices
            .iter()
            .map(|(n, u)| (n.as_str(), u.as_str()))
            .unzip();
        let statement = sqlx::query(
            "WITH q AS (
                SELECT * FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS q(notice_id, user_id, i)),
             s AS (
                INSERT INTO sends (notice_id, user_id, template_id)
                SELECT notice_id, user_id, $3 FROM q
                ON CONFLICT DO NOTHING RETURNING notice_id, user_id),
             d AS (SELECT user_id, count(*)::int AS n FROM s GROUP BY user_id),
             c AS (
                UPDATE credits SET count = greatest(count - d.n, 0), updated_at = now()
                FROM d WHERE credits.user_id = d.user_id AND credits.template_id = $3
                RETURNING credits.user_id, count, exact, version),
             r AS (DELETE FROM held WHERE claimed_by = ANY($1) RETURNING claimed_by, event_id, reason),
             st AS (
                INSERT INTO settled (event_id, kind) SELECT event_id, 'released' FROM r
                ON CONFLICT DO NOTHING),
             sp AS (
                DELETE FROM spells WHERE template_id = $3 AND user_id = ANY($2)
                AND NOT EXISTS (SELECT 1 FROM held h WHERE h.user_id = spells.user_id
                                AND h.template_id = $3
                                AND (h.claimed_by IS NULL OR h.claimed_by <> ALL($1))))
             SELECT c.count, c.exact, c.version,
                    EXISTS (SELECT 1 FROM s WHERE s.notice_id = q.notice_id) AS new,
                    (SELECT count(*) FROM r WHERE r.claimed_by = q.notice_id
                     AND r.reason <> 'window') AS released
             FROM q LEFT JOIN c ON c.user_id = q.user_id
             ORDER BY q.i",
        )
        .bind(&ids)
        .bind(&users)
        .bind(template_id)
        .fetch_all(&self.pool);
        let rows = self.timed(statement).await;
        rows?
            .iter()
            .map(|row| {
                let new: bool = row.try_get("new")?;
                let credit = match row.try_get::<Option<i32>, _>("count")? {
                    Some(count) if new => Some(Credit {
                        count,
                        exact: row.try_get::<Option<bool>, _>("exact")?.unwrap_or(false),
                        version: row.try_get::<Option<i64>, _>("version")?.unwrap_or(0),
                    }),
                    _ => None,
                };
                Ok(Spent {
                    credit,
                    released: row.try_get::<i64, _>("released")?.max(0) as u64,
                })
            })
            .collect()
    }

    /// The notice `notice_id` did not go (parked for a retry, or refused):
    /// its window's rows leave the ledger and its held events are unclaimed.
    ///
    /// # Errors
    /// The ledger failed.
    pub async fn unclaim(&self, notice_id: &str, keep_window: bool) -> Result<()> {
        // `keep_window`: a notice sent again after a crash; its window's
        // deliveries may have been acked on these rows, so they stay held
        // (released with the user's next notice) instead of being deleted.
        let statement = sqlx::query(
            "WITH d AS (DELETE FROM held WHERE claimed_by = $1 AND reason = 'window' AND NOT $2)
             UPDATE held SET claimed_by = NULL,
               reason = CASE WHEN reason = 'window' THEN 'no_credit' ELSE reason END
             WHERE claimed_by = $1 AND (reason <> 'window' OR $2)",
        )
        .bind(notice_id)
        .bind(keep_window)
        .execute(&self.pool);
        self.timed(statement).await?;
        Ok(())
    }

    /// A claimed notice lost window events to `NOTIFIER_MAX_AGE` before its
    /// call and goes with the rest under the id `to`: in one statement, the
    /// claim follows it (its rows marked `from` are marked `to`) and the
    /// expired events' window rows leave the ledger, so a notice sent again
    /// for the claim carries exactly the ids sent.
    ///
    /// # Errors
    /// The ledger failed (nothing changed).
    pub async fn reclaim(&self, from: &str, to: &str, expired: &[String]) -> Result<()> {
        let statement = sqlx::query(
            "WITH d AS (DELETE FROM held WHERE claimed_by = $1 AND reason = 'window'
                        AND event_id = ANY($3))
             UPDATE held SET claimed_by = $2
             WHERE claimed_by = $1 AND NOT (reason = 'window' AND event_id = ANY($3))",
        )
        .bind(from)
        .bind(to)
        .bind(expired)
        .execute(&self.pool);
        self.timed(statement).await?;
        Ok(())
    }

    /// Holds a notice's events, in one statement: with `guard_version`, the
    /// count becomes an exact 0 only if it is still at that version (no
    /// credit counted since the notice read the ledger), else nothing is
    /// written (`CreditCounted`). The notice's claimed rows are unclaimed and
    /// its window's events written (idempotent by event id); the user's spell
    /// of holding starts if none runs.
    ///
    /// # Errors
    /// The ledger failed (nothing is written).
    pub async fn hold(&self, template_id: &str, args: &HoldArgs) -> Result<HoldDone> {
        self.hold_in(&self.pool, template_id, args).await
    }

    /// [`Store::hold`] for many notices in one transaction (one commit, so
    /// one flush of PostgreSQL's log, for the lot), answered in their order.
    /// A user's notices in one batch are held one after the other, each
    /// seeing the one before.
    ///
    /// # Errors
    /// The ledger failed (nothing is written).
    pub async fn hold_many(&self, args: &[HoldArgs], template_id: &str) -> Result<Vec<HoldDone>> {
        if let [one] = args {
            return Ok(vec![self.hold_in(&self.pool, template_id, one).await?]);
        }
        let mut tx = self.pool.begin().await?;
        let mut done = Vec::with_capacity(args.len());
        for a in args {
            done.push(self.hold_in(&mut *tx, template_id, a).await?);
        }
        tx.commit().await?;
        Ok(done)
    }

    async fn hold_in<'e, E>(&self, ex: E, template_id: &str, a: &HoldArgs) -> Result<HoldDone>
    where
        E: sqlx::Executor<'e, Database = sqlx::Postgres>,
    {
        let (conf_users, conf_templates): (Vec<&str>, Vec<&str>) = a
            .confirmed
            .iter()
            .map(|(u, t)| (u.as_str(), t.as_str()))
            .unzip();
        let ids: Vec<&str> = a.events.iter().map(|e| e.event_id.as_str()).collect();
        let bodies: Vec<&[u8]> = a.events.iter().map(|e| e.body.as_slice()).collect();
        let traces: Vec<Option<&str>> = a.events.iter().map(|e| e.traceparent.as_deref()).collect();
        let attempts: Vec<i32> = a.events.iter().map(|e| e.attempts).collect();
        let statement = sqlx::query(
            "WITH g AS (
                INSERT INTO credits AS c (user_id, template_id, count, exact, version)
                SELECT $1, $2, 0, true, 0 WHERE $4
                ON CONFLICT (user_id, template_id) DO UPDATE
                  SET count = 0, exact = true, probed_at = now(), updated_at = now()
                  WHERE c.version = $3
                RETURNING 1),
             ok AS (SELECT 1 AS one WHERE NOT $4 OR EXISTS (SELECT 1 FROM g)),
             u AS (
                UPDATE held SET claimed_by = NULL,
                  reason = CASE WHEN reason = 'window' THEN $5 ELSE reason END,
                  errcode = CASE WHEN reason = 'window' THEN $6 ELSE errcode END
                WHERE claimed_by = $7 AND EXISTS (SELECT 1 FROM ok) RETURNING event_id),
             i AS (
                INSERT INTO held (event_id, user_id, template_id, body, reason, errcode, traceparent, attempts)
                SELECT e, $1, $2, b, $5, $6, tp, a
                FROM unnest($8::text[], $9::bytea[], $10::text[], $11::int4[])
                     WITH ORDINALITY AS x(e, b, tp, a, n)
                WHERE EXISTS (SELECT 1 FROM ok) ORDER BY n
                ON CONFLICT (event_id) DO NOTHING RETURNING event_id),
             sp AS (
                INSERT INTO spells (user_id, template_id, reason)
                SELECT $1, $2, $5 WHERE EXISTS (SELECT 1 FROM ok)
                ON CONFLICT DO NOTHING RETURNING 1),
             o AS (
                INSERT INTO users (user_id, openid) SELECT $1, $12::text WHERE $12::text IS NOT NULL
                ON CONFLICT (user_id) DO UPDATE SET openid = excluded.openid, seen_at = now()),
             sc AS (
                UPDATE spells SET signal_confirmed = true
                FROM unnest($13::text[], $14::text[]) AS x(u, t)
                WHERE spells.user_id = x.u AND spells.template_id = x.t)
             SELECT EXISTS (SELECT 1 FROM ok) AS ok,
                    EXISTS (SELECT 1 FROM sp) AS new_spell,
                    (SELECT count(*) FROM held WHERE user_id = $1 AND template_id = $2)
                      + (SELECT count(*) FROM i) AS held,
                    coalesce((SELECT min(held_at) FROM held WHERE user_id = $1 AND template_id = $2),
                             now()) AS oldest",
        )
        .bind(&a.user_id)
        .bind(template_id)
        .bind(a.guard_version.unwrap_or(0))
        .bind(a.guard_version.is_some())
        .bind(a.reason)
        .bind(a.errcode)
        .bind(&a.notice_id)
        .bind(&ids)
        .bind(&bodies)
        .bind(&traces)
        .bind(&attempts)
        .bind(a.openid.as_deref())
        .bind(&conf_users)
        .bind(&conf_templates)
        .fetch_one(ex);
        let row = self.timed(statement).await?;
        if !row.try_get::<bool, _>("ok")? {
            return Ok(HoldDone::CreditCounted);
        }
        Ok(HoldDone::Held {
            new_spell: row.try_get("new_spell")?,
            held: row.try_get::<i64, _>("held")?.max(0) as u64,
            oldest: row.try_get("oldest")?,
        })
    }

    /// Counts a subscription event once (by event id) and remembers the
    /// openid it carries; returns the user's count either way.
    ///
    /// # Errors
    /// The ledger failed (nothing is counted).
    pub async fn subscription(
        &self,
        event_id: &str,
        user_id: &str,
        template_id: &str,
        openid: Option<&str>,
        status: Status,
    ) -> Result<Counted> {
        let statement = sqlx::query(
            "WITH s AS (
                INSERT INTO settled (event_id, kind) VALUES ($1, 'subscription')
                ON CONFLICT DO NOTHING RETURNING 1),
             c AS (
                INSERT INTO credits AS c (user_id, template_id, count, exact, version)
                SELECT $2, $3, CASE $4 WHEN 'accept' THEN 1 ELSE 0 END, $4 = 'off',
                       CASE $4 WHEN 'reject' THEN 0 ELSE 1 END
                FROM s
                ON CONFLICT (user_id, template_id) DO UPDATE SET
                  count = CASE $4 WHEN 'accept' THEN c.count + 1 WHEN 'off' THEN 0 ELSE c.count END,
                  exact = CASE $4 WHEN 'off' THEN true ELSE c.exact END,
                  version = c.version + CASE $4 WHEN 'reject' THEN 0 ELSE 1 END,
                  updated_at = now()
                RETURNING count, exact, version),
             u AS (
                INSERT INTO users (user_id, openid) VALUES ($2, $5)
                ON CONFLICT (user_id) DO UPDATE
                  SET openid = coalesce(excluded.openid, users.openid), seen_at = now()
                RETURNING openid)
             SELECT EXISTS (SELECT 1 FROM s) AS counted,
                    coalesce((SELECT count FROM c), (SELECT count FROM credits WHERE user_id = $2 AND template_id = $3), 0) AS count,
                    coalesce((SELECT exact FROM c), (SELECT exact FROM credits WHERE user_id = $2 AND template_id = $3), false) AS exact,
                    coalesce((SELECT version FROM c), (SELECT version FROM credits WHERE user_id = $2 AND template_id = $3), 0) AS version,
                    (SELECT openid FROM u) AS openid,
                    (SELECT count(*) FROM held WHERE user_id = $2 AND template_id = $3) AS held",
        )
        .bind(event_id)
        .bind(user_id)
        .bind(template_id)
        .bind(status.as_str())
        .bind(openid)
        .fetch_one(&self.pool);
        let row = self.timed(statement).await?;
        Ok(Counted {
            counted: row.try_get("counted")?,
            credit: Credit {
                count: row.try_get("count")?,
                exact: row.try_get("exact")?,
                version: row.try_get("version")?,
            },
            openid: row.try_get("openid")?,
            held: row.try_get::<i64, _>("held")?.max(0) as u64,
        })
    }

    /// Records that the user held at an exact 0 had a real call now.
    ///
    /// # Errors
    /// The ledger failed.
    pub async fn probed(&self, user_id: &str, template_id: &str) -> Result<()> {
        let statement = sqlx::query(
            "UPDATE credits SET probed_at = now() WHERE user_id = $1 AND template_id = $2",
        )
        .bind(user_id)
        .bind(template_id)
        .execute(&self.pool);
        self.timed(statement).await?;
        Ok(())
    }

    /// Users with held events, the oldest wait first (`ledger held`, the sweep).
    ///
    /// # Errors
    /// The ledger failed.
    pub async fn held_users(&self, limit: i64) -> Result<Vec<HeldUser>> {
        let statement = sqlx::query(
            "SELECT h.user_id, h.template_id, count(*) AS held, min(h.held_at) AS oldest,
                    (array_agg(h.reason ORDER BY h.held_at))[1] AS reason,
                    coalesce(c.count, 0) AS count, coalesce(c.exact, false) AS exact,
                    coalesce(c.version, 0) AS version,
                    EXTRACT(EPOCH FROM now() - coalesce(c.probed_at, now()))::float8 AS since_probe
             FROM held h
             LEFT JOIN credits c ON c.user_id = h.user_id AND c.template_id = h.template_id
             WHERE h.reason <> 'window'
             GROUP BY h.user_id, h.template_id, c.count, c.exact, c.version, c.probed_at
             ORDER BY oldest LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool);
        let rows = self.timed(statement).await;
        rows?
            .iter()
            .map(|r| {
                Ok(HeldUser {
                    user_id: r.try_get("user_id")?,
                    template_id: r.try_get("template_id")?,
                    held: r.try_get::<i64, _>("held")?.max(0) as u64,
                    oldest: r.try_get("oldest")?,
                    reason: r.try_get("reason")?,
                    credit: Credit {
                        count: r.try_get("count")?,
                        exact: r.try_get("exact")?,
                        version: r.try_get("version")?,
                    },
                    since_probe: Duration::from_secs_f64(
                        r.try_get::<f64, _>("since_probe")?.max(0.0),
                    ),
                })
            })
            .collect()
    }

    /// Every held event of one user (`ledger show`), oldest first.
    ///
    /// # Errors
    /// The ledger failed.
    pub async fn held_of(&self, user_id: &str) -> Result<Vec<(String, HeldRow)>> {
        let statement = sqlx::query(
            "SELECT template_id, event_id, body, reason, errcode, held_at, claimed_by, traceparent, attempts
             FROM held WHERE user_id = $1 AND reason <> 'window' ORDER BY held_at, seq",
        )
        .bind(user_id)
        .fetch_all(&self.pool);
        let rows = self.timed(statement).await;
        rows?
            .iter()
            .map(|r| Ok((r.try_get("template_id")?, held_row(r)?)))
            .collect()
    }

    /// Every count the ledger keeps for one user (`ledger show`).
    ///
    /// # Errors
    /// The ledger failed.
    pub async fn credits_of(
        &self,
        user_id: &str,
    ) -> Result<(Vec<(String, Credit)>, Option<String>)> {
        let statement = sqlx::query(
            "SELECT template_id, count, exact, version FROM credits WHERE user_id = $1 ORDER BY template_id",
        )
        .bind(user_id)
        .fetch_all(&self.pool);
        let rows = self.timed(statement).await;
        let statement = sqlx::query("SELECT openid FROM users WHERE user_id = $1")
            .bind(user_id)
            .fetch_optional(&self.pool);
        let openid = self.timed(statement).await;
        let credits = rows?
            .iter()
            .map(|r| {
                Ok((
                    r.try_get("template_id")?,
                    Credit {
                        count: r.try_get("count")?,
                        exact: r.try_get("exact")?,
                        version: r.try_get("version")?,
                    },
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let openid = match openid? {
            Some(r) => r.try_get::<Option<String>, _>("openid")?,
            None => None,
        };
        Ok((credits, openid))
    }

    /// Runs `pass` while holding the sweep's advisory lock (for the length of
    /// one transaction), or returns `None` when another replica holds it.
    ///
    /// # Errors
    /// The ledger failed.
    pub async fn with_sweep_lock<F, Fut, T>(&self, pass: F) -> Result<Option<T>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let mut tx = self.pool.begin().await?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtext($1))")
            .bind(format!("wechat-notifier sweep {}", self.schema))
            .fetch_one(&mut *tx)
            .await?;
        if !got {
            return Ok(None);
        }
        let out = pass().await;
        tx.commit().await?;
        Ok(Some(out))
    }

    /// Held events past their time (`expired`: older than `hold_for`, not
    /// claimed, the user with no untried credit) or over the user's limit
    /// (`over`: the oldest beyond `max`), at most `limit` of each, marked
    /// as this sweep's own in the statement that finds them (`claimed_by` =
    /// `sweep:<database epoch>:<mark>`, returned in each row): a release's
    /// claim leaves them, so an event is never both released and
    /// dead-lettered. Marks older than [`SWEEP_MARK_STALE`] are a sweep's
    /// that died (a replica killed, a session's sweep aborted) and are taken
    /// over; at worst a dead letter repeats. Without `expire`, no expired
    /// event is looked for (none is marked).
    ///
    /// # Errors
    /// The ledger failed.
    pub async fn to_drop(
        &self,
        hold_for: Duration,
        max: u32,
        limit: i64,
        expire: bool,
    ) -> Result<(Vec<(String, HeldRow)>, Vec<(String, HeldRow)>)> {
        let mark = format!("{:08x}", fastrand::u32(..));
        let expired = if !expire {
            Ok(Vec::new())
        } else {
            let sql = format!(
                "WITH e AS (
                SELECT h.event_id
                FROM held h LEFT JOIN credits c ON c.user_id = h.user_id AND c.template_id = h.template_id
                WHERE {free} AND h.reason <> 'window'
                  AND h.held_at < now() - make_interval(secs => $1)
                  AND (h.reason = 'no_openid' OR (coalesce(c.exact, false) AND coalesce(c.count, 0) = 0))
                ORDER BY h.held_at, h.seq LIMIT $2
                FOR UPDATE OF h SKIP LOCKED)
             UPDATE held SET claimed_by = {MARK} FROM e WHERE held.event_id = e.event_id
             RETURNING held.template_id, held.user_id, held.event_id, held.body, held.reason,
                       held.errcode, held.held_at, held.claimed_by, held.traceparent, held.attempts,
                       held.seq",
                free = unmarked("h"),
            );
            let statement = sqlx::query(&sql)
                .bind(hold_for.as_secs_f64())
                .bind(limit)
                .bind(&mark)
                .bind(SWEEP_MARK_STALE.as_secs_f64())
                .fetch_all(&self.pool);
            self.timed(statement).await
        };
        // After the expired ones (marked now, so not taken twice).
        let sql = format!(
            "WITH o AS (
                SELECT event_id FROM (
                  SELECT h.event_id, h.claimed_by, h.held_at, h.seq,
                         row_number() OVER (PARTITION BY user_id, template_id
                                            ORDER BY held_at DESC, seq DESC) AS n
                  FROM held h WHERE reason <> 'window') h
                WHERE n > $1 AND {free} ORDER BY held_at, seq LIMIT $2)
             UPDATE held SET claimed_by = {MARK} FROM o
             WHERE held.event_id = o.event_id AND {held_free}
             RETURNING held.template_id, held.user_id, held.event_id, held.body, held.reason,
                       held.errcode, held.held_at, held.claimed_by, held.traceparent, held.attempts,
                       held.seq",
            free = unmarked("h"),
            held_free = unmarked("held"),
        );
        let statement = sqlx::query(&sql)
            .bind(i64::from(max))
            .bind(limit)
            .bind(&mark)
            .bind(SWEEP_MARK_STALE.as_secs_f64())
            .fetch_all(&self.pool);
        let over = self.timed(statement).await;
        // RETURNING keeps no order: oldest first again.
        let read = |rows: Vec<sqlx::postgres::PgRow>| -> Result<Vec<(String, HeldRow)>> {
            let mut out = rows
                .iter()
                .map(|r| {
                    Ok((
                        r.try_get::<i64, _>("seq")?,
                        r.try_get("user_id")?,
                        held_row(r)?,
                    ))
                })
                .collect::<Result<Vec<(i64, String, HeldRow)>>>()?;
            out.sort_by_key(|(seq, _, r)| (r.held_at, *seq));
            Ok(out.into_iter().map(|(_, u, r)| (u, r)).collect())
        };
        Ok((read(expired?)?, read(over?)?))
    }

    /// A held event whose dead-letter copy was confirmed leaves the ledger
    /// (its id kept as `expired`); a spell of holding ends with its last
    /// event. `by`: the sweep's mark on it (`None`: an unclaimed row).
    ///
    /// # Errors
    /// The ledger failed (the copy may be repeated: at worst a duplicate dead letter).
    pub async fn dropped(&self, event_id: &str, by: Option<&str>) -> Result<()> {
        let statement = sqlx::query(
            "WITH d AS (DELETE FROM held WHERE event_id = $1 AND claimed_by IS NOT DISTINCT FROM $2
                        RETURNING user_id, template_id),
             st AS (INSERT INTO settled (event_id, kind) SELECT $1, 'expired' FROM d
                    ON CONFLICT DO NOTHING)
             DELETE FROM spells s USING d
             WHERE s.user_id = d.user_id AND s.template_id = d.template_id
               AND NOT EXISTS (SELECT 1 FROM held h WHERE h.user_id = d.user_id
                               AND h.template_id = d.template_id AND h.event_id <> $1)",
        )
        .bind(event_id)
        .bind(by)
        .execute(&self.pool);
        self.timed(statement).await?;
        Ok(())
    }

    /// A sweep's dead-letter copy of a held event was not confirmed: its
    /// mark goes, and the event stays held (a later sweep tries again).
    ///
    /// # Errors
    /// The ledger failed (the mark is taken over once it is stale).
    pub async fn unmark(&self, event_id: &str, by: &str) -> Result<()> {
        let statement = sqlx::query(
            "UPDATE held SET claimed_by = NULL WHERE event_id = $1 AND claimed_by = $2",
        )
        .bind(event_id)
        .bind(by)
        .execute(&self.pool);
        self.timed(statement).await?;
        Ok(())
    }

    /// Spells whose `notifier.notice_held` the broker has not confirmed yet.
    ///
    /// # Errors
    /// The ledger failed.
    pub async fn unconfirmed_spells(
        &self,
    ) -> Result<Vec<(String, String, String, u64, DateTime<Utc>)>> {
        let statement = sqlx::query(
            "SELECT s.user_id, s.template_id, s.reason, count(h.event_id) AS held,
                    coalesce(min(h.held_at), s.started_at) AS oldest
             FROM spells s LEFT JOIN held h ON h.user_id = s.user_id AND h.template_id = s.template_id
             WHERE NOT s.signal_confirmed
             GROUP BY s.user_id, s.template_id, s.reason, s.started_at LIMIT 500",
        )
        .fetch_all(&self.pool);
        let rows = self.timed(statement).await;
        rows?
            .iter()
            .map(|r| {
                Ok((
                    r.try_get("user_id")?,
                    r.try_get("template_id")?,
                    r.try_get("reason")?,
                    r.try_get::<i64, _>("held")?.max(0) as u64,
                    r.try_get("oldest")?,
                ))
            })
            .collect()
    }

    /// The broker confirmed these spells' `notifier.notice_held` (user,
    /// template), in one statement.
    ///
    /// # Errors
    /// The ledger failed (the sweep publishes them again).
    pub async fn signals_confirmed(&self, spells: &[(String, String)]) -> Result<()> {
        let (users, templates): (Vec<&str>, Vec<&str>) =
            spells.iter().map(|(u, t)| (u.as_str(), t.as_str())).unzip();
        let statement = sqlx::query(
            "UPDATE spells SET signal_confirmed = true
             FROM unnest($1::text[], $2::text[]) AS x(u, t)
             WHERE spells.user_id = x.u AND spells.template_id = x.t",
        )
        .bind(&users)
        .bind(&templates)
        .execute(&self.pool);
        self.timed(statement).await?;
        Ok(())
    }

    /// Privacy and growth: ids settled longer than `hold_for` ago, old sends,
    /// and users idle that long with nothing held are deleted.
    ///
    /// # Errors
    /// The ledger failed.
    pub async fn forget_old(&self, hold_for: Duration) -> Result<()> {
        let statement = sqlx::query(
            "WITH a AS (DELETE FROM settled WHERE at < now() - make_interval(secs => $1)),
             b AS (DELETE FROM sends WHERE at < now() - make_interval(secs => $1))
             DELETE FROM users u WHERE u.seen_at < now() - make_interval(secs => $1)
               AND NOT EXISTS (SELECT 1 FROM held h WHERE h.user_id = u.user_id)",
        )
        .bind(hold_for.as_secs_f64())
        .execute(&self.pool);
        self.timed(statement).await?;
        Ok(())
    }

    /// Gauges for `/metrics`: held events, users with held events, users
    /// whose oldest held event is older than a day.
    ///
    /// # Errors
    /// The ledger failed.
    pub async fn totals(&self) -> Result<(u64, u64, u64)> {
        let statement = sqlx::query(
            "SELECT count(*) AS events, count(DISTINCT user_id) AS users,
                    (SELECT count(*) FROM (SELECT user_id FROM held WHERE reason <> 'window'
                      GROUP BY user_id HAVING min(held_at) < now() - interval '1 day') x) AS old
             FROM held WHERE reason <> 'window'",
        )
        .fetch_one(&self.pool);
        let row = self.timed(statement).await?;
        let n = |c: &str| -> Result<u64> { Ok(row.try_get::<i64, _>(c)?.max(0) as u64) };
        Ok((n("events")?, n("users")?, n("old")?))
    }
}

/// A sweep's mark on the held rows it dead-letters, computed by the
/// database: `sweep:<epoch seconds>:<the pass's own mark, $3>`.
const MARK: &str = "'sweep:' || floor(extract(epoch FROM now()))::bigint || ':' || $3";

/// How old a sweep's mark is when its sweep is taken to be dead.
pub const SWEEP_MARK_STALE: Duration = Duration::from_secs(600);

/// A condition on the held row `h`: not claimed, or marked by a sweep that
/// died (its mark older than `$4` seconds).
fn unmarked(h: &str) -> String {
    format!(
        "({h}.claimed_by IS NULL OR CASE WHEN {h}.claimed_by LIKE 'sweep:%'
           THEN split_part({h}.claimed_by, ':', 2)::bigint < extract(epoch FROM now()) - $4
           ELSE false END)"
    )
}

/// The claim a notice made before its call.
#[derive(Debug, Clone)]
pub struct Claim {
    pub notice_id: String,
    /// The held events it covers, oldest first.
    pub rows: Vec<HeldRow>,
    /// Rows claimed by earlier notices whose outcome is unknown, per notice id.
    pub stale: Vec<(String, Vec<HeldRow>)>,
}

/// Why a claim failed.
#[derive(Debug, Clone)]
pub struct ClaimError {
    pub error: LedgerError,
    /// The COMMIT's answer was lost: the claim may stand under this notice id.
    pub commit_lost: Option<String>,
}

impl From<sqlx::Error> for ClaimError {
    fn from(e: sqlx::Error) -> Self {
        ClaimError {
            error: e.into(),
            commit_lost: None,
        }
    }
}

impl From<LedgerError> for ClaimError {
    fn from(error: LedgerError) -> Self {
        ClaimError {
            error,
            commit_lost: None,
        }
    }
}

fn held_row(r: &sqlx::postgres::PgRow) -> Result<HeldRow> {
    Ok(HeldRow {
        event_id: r.try_get("event_id")?,
        body: r.try_get("body")?,
        reason: r.try_get("reason")?,
        errcode: r.try_get("errcode")?,
        held_at: r.try_get("held_at")?,
        claimed_by: r.try_get("claimed_by")?,
        traceparent: r.try_get("traceparent")?,
        attempts: r.try_get("attempts")?,
    })
}

async fn insert_held(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    user_id: &str,
    template_id: &str,
    events: &[ToHold],
    reason: &str,
    errcode: Option<i32>,
    claimed_by: Option<&str>,
) -> Result<()> {
    let ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    let bodies: Vec<&[u8]> = events.iter().map(|e| e.body.as_slice()).collect();
    let traces: Vec<Option<&str>> = events.iter().map(|e| e.traceparent.as_deref()).collect();
    let attempts: Vec<i32> = events.iter().map(|e| e.attempts).collect();
    sqlx::query(
        "INSERT INTO held (event_id, user_id, template_id, body, reason, errcode, claimed_by, traceparent, attempts)
         SELECT e, $1, $2, b, $3, $4, $5, tp, a
         FROM unnest($6::text[], $7::bytea[], $8::text[], $9::int4[])
              WITH ORDINALITY AS x(e, b, tp, a, n)
         ORDER BY n
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(user_id)
    .bind(template_id)
    .bind(reason)
    .bind(errcode)
    .bind(claimed_by)
    .bind(&ids)
    .bind(&bodies)
    .bind(&traces)
    .bind(&attempts)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
