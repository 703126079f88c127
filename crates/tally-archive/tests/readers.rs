//! The archive in an open format: DuckDB and pyarrow (both from PyPI; `.ci/run` installs
//! them) read the files tally writes and get the same per-video counts and sums as
//! `tally_archive::aggregate`.

use std::process::Command;

use tally_archive::{Archive, FileBuilder, FileKey, aggregate};
use tally_core::EventRef;

const READ_WITH_PYTHON: &str = r#"
import json, sys
import duckdb, pyarrow.dataset as ds
root = sys.argv[1]
rows = duckdb.sql(f"""
    select type, video_id, count(*) as n, sum(value) as s
    from read_parquet('{root}/events/*/*/*.parquet', hive_partitioning = true)
    group by all
""").fetchall()
by_duckdb = {f"{t}/{v}": [n, s] for t, v, n, s in rows}
table = ds.dataset(f"{root}/events", format="parquet", partitioning="hive").to_table()
grouped = table.group_by(["type", "video_id"]).aggregate([("value", "count"), ("value", "sum")])
by_pyarrow = {f"{t}/{v}": [n, s] for t, v, n, s in zip(*(grouped.column(c).to_pylist() for c in ["type", "video_id", "value_count", "value_sum"]))}
schema = {f.name: str(f.type) for f in table.schema}
print(json.dumps({"duckdb": by_duckdb, "pyarrow": by_pyarrow, "schema": schema}))
"#;

#[test]
fn duckdb_and_pyarrow_read_the_same_counts_as_tally() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Archive::open(dir.path().to_str().unwrap()).unwrap();
    let hour = 3_600_000;
    let videos: Vec<String> = (0..50).map(|v| format!("video-{v}")).collect();
    let mut offset = 0;
    for file in 0..6u64 {
        let (partition, received) = ((file % 2) as u32, 1_764_633_600_000 + (file as i64) * hour);
        let mut builder = FileBuilder::default();
        let first = offset;
        for i in 0..10_000u64 {
            let video = &videos[((i * 7 + file) % 50) as usize];
            let event_type = if i % 5 == 0 { "like" } else { "view" };
            let event = EventRef {
                video_id: video,
                event_type,
                ts_ms: received - 1_000,
                value: (i % 3) as i64,
                event_id: None,
                viewer_id: None,
            };
            builder.push(&event, received, partition, offset);
            offset += 1;
        }
        archive.put(&FileKey::of(partition, received).path(first, offset), builder.encode().unwrap()).unwrap();
    }
    let totals = aggregate(&archive, &archive.files().unwrap(), i64::MIN, i64::MAX).unwrap();
    assert_eq!(totals.rows_read, 60_000);
    let output = Command::new("python3").arg("-c").arg(READ_WITH_PYTHON).arg(dir.path()).output().unwrap();
    assert!(output.status.success(), "python3 with duckdb and pyarrow: {}", String::from_utf8_lossy(&output.stderr));
    let read: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let expected: serde_json::Map<String, serde_json::Value> = totals
        .totals
        .iter()
        .map(|((t, v), total)| (format!("{t}/{v}"), serde_json::json!([total.count, total.sum])))
        .collect();
    assert_eq!(expected.len(), 100, "50 videos, two types");
    for reader in ["duckdb", "pyarrow"] {
        assert_eq!(read[reader].as_object().unwrap(), &expected, "{reader} counts as tally does");
    }
    let schema = &read["schema"];
    assert_eq!(schema["ts"], "timestamp[ms, tz=UTC]", "{schema}");
    assert_eq!(schema["video_id"], "string");
    assert!(schema["date"].is_string() && schema["hour"].is_string(), "the layout reads as hive partitions: {schema}");
}
