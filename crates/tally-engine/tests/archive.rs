//! The archive across restarts that change it: archiving turned off and on again leaves
//! out what was flushed meanwhile (its duplicates cannot be told) instead of archiving it
//! with them; a data directory made anew under an old archive is refused.

use tally_archive::{Archive, aggregate};
use tally_core::EventRef;
use tally_engine::{Engine, EngineConfig};

fn ingest(config: &EngineConfig, video_id: &str, ids: &[&str]) {
    let engine = Engine::open(config.clone()).unwrap();
    let events: Vec<EventRef<'_>> = ids
        .iter()
        .map(|id| EventRef {
            video_id,
            event_type: "view",
            ts_ms: 1_000,
            value: 1,
            event_id: Some(id),
            viewer_id: None,
        })
        .collect();
    engine.submit(&events, None, 2_000).unwrap().outcome_blocking().unwrap();
    engine.shutdown().unwrap();
}

fn archived_count(location: &str, video_id: &str) -> u64 {
    let archive = Archive::open(location).unwrap();
    let totals = aggregate(&archive, &archive.files().unwrap(), i64::MIN, i64::MAX).unwrap();
    totals.totals.get(&("view".to_string(), video_id.to_string())).map_or(0, |t| t.count)
}

#[test]
fn archiving_off_then_on_leaves_out_what_was_flushed_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().join("archive").display().to_string();
    let plain = EngineConfig { data_dir: dir.path().join("data"), partitions: 1, ..EngineConfig::default() };
    let archiving = EngineConfig { archive: Some(location.clone()), ..plain.clone() };
    ingest(&archiving, "before", &["a", "b", "a"]);
    ingest(&plain, "meanwhile", &["c", "c", "d"]);
    ingest(&archiving, "after", &["e", "f", "e"]);
    assert_eq!(archived_count(&location, "before"), 2);
    assert_eq!(
        archived_count(&location, "meanwhile"),
        0,
        "flushed without notes: left out, not archived with its duplicate"
    );
    assert_eq!(archived_count(&location, "after"), 2);
}

#[test]
fn a_data_directory_made_anew_under_an_old_archive_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().join("archive").display().to_string();
    let config = EngineConfig {
        data_dir: dir.path().join("data"),
        partitions: 1,
        archive: Some(location.clone()),
        ..EngineConfig::default()
    };
    ingest(&config, "v", &["a", "b"]);
    std::fs::remove_dir_all(dir.path().join("data")).unwrap();
    let refused = Engine::open(config).err().expect("refused").to_string();
    assert!(refused.contains("past the store's checkpoint"), "{refused}");
    assert_eq!(archived_count(&location, "v"), 2, "the old archive is left as it was");
}
