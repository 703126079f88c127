//! The HELP text of every metric tally exports, described when the recorder is installed
//! (`promtool check metrics` wants one for each; a test runs it).

use metrics::{describe_counter, describe_gauge, describe_histogram};

/// What each metric counts: (kind, name, help).
const METRICS: [(Kind, &str, &str); 53] = [
    (Kind::Counter, "tally_archive_files_total", "Archive files written (one per archiving round)."),
    (Kind::Counter, "tally_archive_events_total", "Counted events written to the archive."),
    (Kind::Counter, "tally_archive_errors_total", "Archiving rounds that failed (retried; the log keeps the frames)."),
    (
        Kind::Counter,
        "tally_archive_gaps_total",
        "Log stretches the archive lacks: flushed while archiving was off, or gone from the log before archived.",
    ),
    (Kind::Gauge, "tally_archive_failing", "1 while archiving fails (why: /readyz), else 0; the log keeps what waits."),
    (Kind::Counter, "tally_archive_purged_files_total", "Archive files deleted past archive_retention_days."),
    (Kind::Gauge, "tally_archive_offset", "Log offset before which every counted event is archived, per partition."),
    (
        Kind::Gauge,
        "tally_archive_lag_bytes",
        "Log checkpointed in the store but not yet archived, per partition: bytes (Kafka messages in cluster mode).",
    ),
    (Kind::Counter, "tally_connections_shed_total", "Connections refused at the connection limit (fast 503)."),
    (Kind::Counter, "tally_connections_timed_out_total", "Connections closed for an idle, head or body deadline."),
    (
        Kind::Counter,
        "tally_dead_letter_failures_total",
        "Cluster: undecodable messages that could not be dead-lettered.",
    ),
    (Kind::Counter, "tally_dead_letters_total", "Cluster and bridge: messages sent to the dead-letter topic."),
    (
        Kind::Counter,
        "tally_event_types_refused_total",
        "Requests refused because they would add an event type past event_types_max.",
    ),
    (Kind::Counter, "tally_events_accepted_total", "Events counted (applied once)."),
    (
        Kind::Counter,
        "tally_events_duplicate_total",
        "Events recognised as duplicates (event id or Idempotency-Key) and not counted again.",
    ),
    (Kind::Counter, "tally_events_rejected_total", "Events in requests refused as invalid (400)."),
    (
        Kind::Counter,
        "tally_group_rejoins_total",
        "Cluster: times this node left and rejoined the owners' group to mend unowned partitions.",
    ),
    (
        Kind::Counter,
        "tally_keys_file_errors_total",
        "Times the API keys file did not parse (the keys before stay in force).",
    ),
    (
        Kind::Counter,
        "tally_log_anomalies_total",
        "Cluster: log offsets skipped (kind=gap, counts short) or delivered twice (kind=repeated_offset).",
    ),
    (
        Kind::Counter,
        "tally_log_appends_uncertain_total",
        "Log appends whose outcome is unknown (answered 503 outcome_unknown).",
    ),
    (Kind::Counter, "tally_log_refetches_total", "Cluster: partitions read again because the log skipped offsets."),
    (Kind::Counter, "tally_partition_claims_total", "Cluster: partitions claimed by this node."),
    (
        Kind::Counter,
        "tally_partition_fenced_total",
        "Cluster: flushes refused because another node owns the partition now.",
    ),
    (Kind::Counter, "tally_producer_renewals_total", "Cluster: Kafka producers replaced after a fatal error."),
    (
        Kind::Counter,
        "tally_rate_limited_total",
        "Requests refused by an API key's rate limit (limit=requests or events).",
    ),
    (Kind::Counter, "tally_retention_tables_dropped_total", "Store tables dropped wholly past retention."),
    (Kind::Counter, "tally_store_commit_failures_total", "Store commits that failed (retried when transient)."),
    (Kind::Counter, "tally_wal_remove_failures_total", "Failures to remove checkpointed log segments (retried)."),
    (
        Kind::Counter,
        "tally_wal_writes_refused_total",
        "Log writes refused before anything was written (disk full, transient errors).",
    ),
    (
        Kind::Counter,
        "tally_writer_stalls_total",
        "Times a partition writer waited for the flusher (pending_cells_max reached).",
    ),
    (Kind::Gauge, "tally_body_bytes_in_flight", "Request body bytes being read or parsed now."),
    (Kind::Gauge, "tally_connections_open", "Client connections open now."),
    (Kind::Gauge, "tally_engine_failed", "1 when the engine stopped acknowledging writes for good (restart needed)."),
    (Kind::Gauge, "tally_event_types", "Distinct event types known."),
    (Kind::Gauge, "tally_partition_applied_offset", "Log offset applied in memory, per partition."),
    (Kind::Gauge, "tally_partition_checkpoint_offset", "Log offset the store holds, per partition."),
    (Kind::Gauge, "tally_partition_dedup_entries", "Entries in the dedup memory, per partition."),
    (
        Kind::Gauge,
        "tally_partition_lag_records",
        "Cluster: the broker's high watermark past the stored checkpoint, per owned partition.",
    ),
    (Kind::Gauge, "tally_partition_owned", "Cluster: 1 when this node owns the partition."),
    (Kind::Gauge, "tally_partition_pending_cells", "Counter cells in memory not yet in the store, per partition."),
    (Kind::Gauge, "tally_partition_queued_appends", "Requests queued for the partition's writer."),
    (Kind::Gauge, "tally_queue_bytes", "Bytes of records accepted and not yet acknowledged."),
    (Kind::Gauge, "tally_recovery_seconds", "How long the last recovery took."),
    (Kind::Gauge, "tally_store_failing", "1 while store writes fail (flushes are retried)."),
    (Kind::Gauge, "tally_wal_bytes", "Bytes of log segments held, per partition."),
    (Kind::Gauge, "tally_wal_segments", "Log segments held, per partition."),
    (Kind::Gauge, "tally_build_info", "Always 1; the version label names the build."),
    (Kind::Histogram, "tally_flush_cells", "Counter cells written per flush."),
    (Kind::Histogram, "tally_flush_seconds", "Duration of a flush to the store."),
    (Kind::Histogram, "tally_http_request_duration_seconds", "HTTP request duration, per route, method and status."),
    (Kind::Histogram, "tally_retention_purge_seconds", "Duration of a retention purge."),
    (Kind::Histogram, "tally_wal_fsync_seconds", "Duration of a log append's fdatasync."),
    (Kind::Histogram, "tally_wal_group_records", "Requests made durable by one fdatasync (group commit)."),
];

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Counters with labels, and the values they take: each starts at 0 too.
const LABELLED_COUNTERS: [(&str, &str, &[&str]); 2] = [
    ("tally_log_anomalies_total", "kind", &["gap", "repeated_offset"]),
    ("tally_rate_limited_total", "limit", &["requests", "events"]),
];

/// Describes every metric, shows every counter from the start (at 0, so a rate over the
/// first event is right), and sets `tally_build_info`.
pub(crate) fn describe() {
    for (kind, name, help) in METRICS {
        match kind {
            Kind::Counter => {
                describe_counter!(name, help);
                if !LABELLED_COUNTERS.iter().any(|(labelled, _, _)| *labelled == name) {
                    metrics::counter!(name).absolute(0);
                }
            }
            Kind::Gauge => describe_gauge!(name, help),
            Kind::Histogram => describe_histogram!(name, help),
        }
    }
    for (name, label, values) in LABELLED_COUNTERS {
        for value in values {
            metrics::counter!(name, label => *value).absolute(0);
        }
    }
    metrics::gauge!("tally_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}
