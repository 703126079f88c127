//! A read view: one `REPEATABLE READ READ ONLY` transaction on a pooled connection, so
//! every table is read at the same instant, with the checkpoints and the list of period
//! tables read when it opens.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

use tally_core::hll::Hll;
use tally_core::topk::TopSketch;
use tally_core::{Counter, Granularity, Span};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::pool::{Pooled, wait};
use super::{pg_error, schema};
use crate::tables::{self, Kind};
use crate::{Snapshot, StoreError};

pub(super) struct PgSnapshot<'p> {
    connection: RefCell<Pooled<'p>>,
    checkpoints: HashMap<u32, u64>,
    tables: HashSet<String>,
}

impl<'p> PgSnapshot<'p> {
    pub(super) fn open(mut connection: Pooled<'p>) -> Result<PgSnapshot<'p>, StoreError> {
        let checkpoints = connection.statement("SELECT partition, log_offset FROM tally_checkpoints")?;
        let tables = connection.statement("SELECT name FROM tally_tables")?;
        let client = &connection.client;
        // Sent together: one round trip.
        let (_, checkpoints, tables) = wait(async {
            tokio::try_join!(
                client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"),
                client.query(&checkpoints, &[]),
                client.query(&tables, &[]),
            )
        })
        .map_err(|error| {
            connection.end();
            pg_error("begin read")(error)
        })?;
        let checkpoints = checkpoints
            .iter()
            .filter_map(|row| Some((row.get::<_, i32>(0) as u32, row.get::<_, Option<i64>>(1)? as u64)))
            .collect();
        let tables = tables.iter().map(|row| row.get(0)).collect();
        Ok(PgSnapshot { connection: RefCell::new(connection), checkpoints, tables })
    }

    /// The rows of `sql` (with `{table}` standing for each period table of `kind` that
    /// `span` touches, oldest first) bound to `params`, then the span's bounds in that
    /// table.
    fn scan(
        &self,
        kind: Kind,
        span: Span,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        visit: &mut dyn FnMut(&Row) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut connection = self.connection.borrow_mut();
        for (period, from, to) in tables::periods(span.granularity, span.start, span.end) {
            let table = schema::table(kind, span.granularity, period);
            if !self.tables.contains(&table) {
                continue;
            }
            let statement = connection.statement(&sql.replace("{table}", &table))?;
            let mut bound: Vec<&(dyn ToSql + Sync)> = params.to_vec();
            bound.push(&from);
            bound.push(&to);
            let rows = wait(connection.client.query(&statement, &bound)).map_err(pg_error("read"))?;
            for row in &rows {
                visit(row)?;
            }
        }
        Ok(())
    }
}

impl Drop for PgSnapshot<'_> {
    fn drop(&mut self) {
        self.connection.get_mut().end();
    }
}

fn counter(count: &str, sum: &str) -> Result<Counter, StoreError> {
    let corrupt = || StoreError::Corrupt { detail: format!("counter ({count}, {sum}) is not two integers") };
    Ok(Counter { count: count.parse().map_err(|_| corrupt())?, sum: sum.parse().map_err(|_| corrupt())? })
}

impl Snapshot for PgSnapshot<'_> {
    fn checkpoint_offset(&self, partition: u32) -> Result<u64, StoreError> {
        Ok(self.checkpoints.get(&partition).copied().unwrap_or(0))
    }

    fn sum(&self, event_type: &str, video_id: &str, span: Span) -> Result<Counter, StoreError> {
        let sql = "SELECT COALESCE(SUM(count), 0)::TEXT, COALESCE(SUM(sum), 0)::TEXT FROM {table} \
                   WHERE event_type = $1 AND video_id = $2 AND bucket >= $3 AND bucket < $4";
        let mut total = Counter::default();
        self.scan(Kind::Counters, span, sql, &[&event_type, &video_id], &mut |row| {
            total.add(counter(row.get(0), row.get(1))?);
            Ok(())
        })?;
        Ok(total)
    }

    fn buckets(
        &self,
        event_type: &str,
        video_id: &str,
        granularity: Granularity,
        start: i64,
        end: i64,
        visit: &mut dyn FnMut(i64, Counter),
    ) -> Result<(), StoreError> {
        let sql = "SELECT bucket, count::TEXT, sum::TEXT FROM {table} \
                   WHERE event_type = $1 AND video_id = $2 AND bucket >= $3 AND bucket < $4 ORDER BY bucket";
        self.scan(Kind::Counters, Span { granularity, start, end }, sql, &[&event_type, &video_id], &mut |row| {
            visit(row.get(0), counter(row.get(1), row.get(2))?);
            Ok(())
        })
    }

    fn uniques(&self, event_type: &str, video_id: &str, span: Span, into: &mut Hll) -> Result<(), StoreError> {
        let sql = "SELECT sketch FROM {table} \
                   WHERE event_type = $1 AND video_id = $2 AND bucket >= $3 AND bucket < $4";
        self.scan(Kind::Uniques, span, sql, &[&event_type, &video_id], &mut |row| {
            into.merge(&Hll::decode(row.get(0)).map_err(|detail| StoreError::Corrupt { detail })?);
            Ok(())
        })
    }

    fn top(&self, event_type: &str, span: Span, into: &mut TopSketch) -> Result<(), StoreError> {
        let sql = "SELECT sketch FROM {table} WHERE event_type = $1 AND bucket >= $2 AND bucket < $3";
        self.scan(Kind::Top, span, sql, &[&event_type], &mut |row| {
            into.merge_encoded(row.get(0)).map_err(|detail| StoreError::Corrupt { detail })
        })
    }

    fn videos(&self, event_type: &str, start: i64, end: i64, visit: &mut dyn FnMut(&str)) -> Result<(), StoreError> {
        let sql = "SELECT video_id FROM {table} WHERE event_type = $1 AND day >= $2 AND day < $3";
        self.scan(Kind::Videos, Span { granularity: Granularity::Day, start, end }, sql, &[&event_type], &mut |row| {
            visit(row.get(0));
            Ok(())
        })
    }

    /// The types with day counters of the video in `[start, end)`: one index probe per
    /// known type in each period table.
    fn video_types(&self, video_id: &str, start: i64, end: i64, visit: &mut dyn FnMut(&str)) -> Result<(), StoreError> {
        let types = self.types()?;
        let sql = "SELECT DISTINCT event_type FROM {table} \
                   WHERE event_type = ANY($1) AND video_id = $2 AND bucket >= $3 AND bucket < $4";
        let span = Span { granularity: Granularity::Day, start, end };
        self.scan(Kind::Counters, span, sql, &[&types, &video_id], &mut |row| {
            visit(row.get(0));
            Ok(())
        })
    }

    fn types(&self) -> Result<Vec<String>, StoreError> {
        let mut connection = self.connection.borrow_mut();
        let statement = connection.statement("SELECT event_type FROM tally_types")?;
        let rows = wait(connection.client.query(&statement, &[])).map_err(pg_error("read types"))?;
        let mut types: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
        types.sort_unstable();
        Ok(types)
    }
}
