//! The buffered client: `send` puts an event in a bounded buffer and returns; a background
//! task cuts the buffer into batches (by count, bytes, or linger time) and posts them,
//! several in flight, each under its own Idempotency-Key, kept across its retries.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use rand::Rng;
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::metrics::Snapshot;
use crate::{Api, ApiConfig, Error};

/// What `send` does when the buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Wait for room: back-pressure on the caller.
    Wait,
    /// Refuse the event at once (`Error::Full`) and count it dropped: the caller never waits.
    Drop,
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub api: ApiConfig,
    /// Events per request at most.
    pub batch_events_max: usize,
    /// Bytes of NDJSON per request at most (the server's default body limit is 8 MiB).
    pub batch_bytes_max: usize,
    /// How long the first event of a batch waits for more before the batch is sent.
    pub linger: Duration,
    /// Bytes of events buffered or in flight at most: the client's memory bound.
    pub buffer_bytes_max: usize,
    pub when_full: WhenFull,
    /// Requests in flight at once.
    pub requests_in_flight_max: usize,
}

impl ClientConfig {
    pub fn new(server: impl Into<String>) -> ClientConfig {
        ClientConfig {
            api: ApiConfig::new(server),
            batch_events_max: 1000,
            batch_bytes_max: 1 << 20,
            linger: Duration::from_millis(50),
            buffer_bytes_max: 32 << 20,
            when_full: WhenFull::Wait,
            requests_in_flight_max: 4,
        }
    }
}

/// One event, as `POST /v1/events` takes it. Absent fields take the server's defaults
/// (type `view`, value 1, the receive time).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Event {
    pub video_id: String,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    /// Event time, epoch milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<i64>,
    /// The event's own id: the server counts an id once within its dedup window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub viewer_id: Option<String>,
}

impl Event {
    /// A `view` of `video_id`, now.
    pub fn view(video_id: impl Into<String>) -> Event {
        Event { video_id: video_id.into(), ..Event::default() }
    }

    pub fn of_type(mut self, event_type: impl Into<String>) -> Event {
        self.event_type = Some(event_type.into());
        self
    }

    pub fn at(mut self, ts_ms: i64) -> Event {
        self.ts = Some(ts_ms);
        self
    }

    pub fn with_id(mut self, event_id: impl Into<String>) -> Event {
        self.event_id = Some(event_id.into());
        self
    }

    pub fn by(mut self, viewer_id: impl Into<String>) -> Event {
        self.viewer_id = Some(viewer_id.into());
        self
    }

    pub fn with_value(mut self, value: i64) -> Event {
        self.value = Some(value);
        self
    }
}

enum Item {
    Event(Vec<u8>),
    /// Send what is buffered now, and answer with the batch number every earlier event
    /// is in or before.
    Flush(oneshot::Sender<u64>),
}

/// A buffered, batching client. Cheap to share behind an `Arc`; `close` sends what is left.
pub struct Client {
    api: Api,
    items: mpsc::UnboundedSender<Item>,
    /// Free buffer bytes: `send` takes an event's size, its batch's end gives it back.
    room: Arc<Semaphore>,
    /// Every batch numbered below this is finished (sent or given up on).
    finished_below: watch::Receiver<u64>,
    last_error: Arc<Mutex<Option<String>>>,
    batch_bytes_max: usize,
    when_full: WhenFull,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Starts the client's background task on the current tokio runtime.
    pub fn new(config: ClientConfig) -> Result<Client, Error> {
        if config.batch_events_max == 0 || config.requests_in_flight_max == 0 {
            return Err(Error::Config("batch_events_max and requests_in_flight_max must be at least 1".into()));
        }
        if config.buffer_bytes_max < config.batch_bytes_max || config.buffer_bytes_max > Semaphore::MAX_PERMITS {
            return Err(Error::Config("buffer_bytes_max must hold at least one batch (batch_bytes_max)".into()));
        }
        let api = Api::new(config.api.clone())?;
        let (items, receiver) = mpsc::unbounded_channel();
        let room = Arc::new(Semaphore::new(config.buffer_bytes_max));
        let (finished_tx, finished_below) = watch::channel(0);
        let last_error = Arc::new(Mutex::new(None));
        let batcher = Batcher {
            api: api.clone(),
            room: Arc::clone(&room),
            finished: finished_tx,
            last_error: Arc::clone(&last_error),
            in_flight: BTreeSet::new(),
            next_batch: 0,
            lines: Vec::new(),
            bytes: 0,
        };
        let task = tokio::spawn(batcher.run(receiver, config.clone()));
        let (batch_bytes_max, when_full) = (config.batch_bytes_max, config.when_full);
        Ok(Client { api, items, room, finished_below, last_error, batch_bytes_max, when_full, task })
    }

    /// Buffers one event. With `WhenFull::Wait` it waits while the buffer is full; with
    /// `WhenFull::Drop` it returns `Error::Full` at once.
    pub async fn send(&self, event: &Event) -> Result<(), Error> {
        let mut line = serde_json::to_vec(event).map_err(|error| Error::Config(error.to_string()))?;
        line.push(b'\n');
        if line.len() > self.batch_bytes_max {
            return Err(Error::Config(format!("an event of {} bytes is larger than batch_bytes_max", line.len())));
        }
        let size = u32::try_from(line.len()).expect("below batch_bytes_max");
        let permit = match self.when_full {
            WhenFull::Wait => self.room.acquire_many(size).await.map_err(|_| Error::Closed)?,
            WhenFull::Drop => self.room.try_acquire_many(size).map_err(|_| {
                self.api.counters().dropped(1);
                Error::Full
            })?,
        };
        permit.forget();
        self.api.counters().buffered(1);
        self.items.send(Item::Event(line)).map_err(|_| Error::Closed)
    }

    /// Sends everything buffered before this call and waits until each of those events
    /// is acknowledged or given up on (see `stats`).
    pub async fn flush(&self) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        self.items.send(Item::Flush(reply)).map_err(|_| Error::Closed)?;
        let below = answer.await.map_err(|_| Error::Closed)?;
        let mut finished = self.finished_below.clone();
        finished.wait_for(|&finished| finished >= below).await.map_err(|_| Error::Closed)?;
        Ok(())
    }

    /// Sends what is left and stops the background task.
    pub async fn close(self) -> Result<Snapshot, Error> {
        let Client { api, items, task, .. } = self;
        drop(items);
        task.await.map_err(|error| Error::Protocol(format!("the client's task failed: {error}")))?;
        Ok(api.stats())
    }

    pub fn stats(&self) -> Snapshot {
        self.api.stats()
    }

    /// Why the last batch given up on was given up on.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    /// The client's API, for queries over the same connections.
    pub fn api(&self) -> &Api {
        &self.api
    }
}

struct Batcher {
    api: Api,
    room: Arc<Semaphore>,
    finished: watch::Sender<u64>,
    last_error: Arc<Mutex<Option<String>>>,
    in_flight: BTreeSet<u64>,
    next_batch: u64,
    lines: Vec<u8>,
    bytes: usize,
}

/// A finished batch: its number, events and buffer bytes.
type Done = (u64, usize, usize);

impl Batcher {
    async fn run(mut self, mut items: mpsc::UnboundedReceiver<Item>, config: ClientConfig) {
        let mut requests: JoinSet<Done> = JoinSet::new();
        let mut events = 0;
        let mut deadline = tokio::time::Instant::now();
        let mut open = true;
        while open || events > 0 || !requests.is_empty() {
            let room = requests.len() < config.requests_in_flight_max;
            tokio::select! {
                item = items.recv(), if open && room => match item {
                    Some(Item::Event(line)) => {
                        if self.bytes + line.len() > config.batch_bytes_max {
                            self.dispatch(&mut requests, std::mem::take(&mut events));
                        }
                        if events == 0 {
                            deadline = tokio::time::Instant::now() + config.linger;
                        }
                        self.bytes += line.len();
                        self.lines.extend_from_slice(&line);
                        events += 1;
                        if events >= config.batch_events_max {
                            self.dispatch(&mut requests, std::mem::take(&mut events));
                        }
                    }
                    Some(Item::Flush(reply)) => {
                        self.dispatch(&mut requests, std::mem::take(&mut events));
                        let _ = reply.send(self.next_batch);
                    }
                    None => {
                        open = false;
                        self.dispatch(&mut requests, std::mem::take(&mut events));
                    }
                },
                _ = tokio::time::sleep_until(deadline), if events > 0 && (room || !open) => {
                    self.dispatch(&mut requests, std::mem::take(&mut events));
                }
                Some(done) = requests.join_next() => self.finish(done.expect("batch tasks do not panic")),
            }
        }
    }

    /// Posts the buffered events as one batch, under a key of its own.
    fn dispatch(&mut self, requests: &mut JoinSet<Done>, events: usize) {
        if events == 0 {
            return;
        }
        let (number, bytes) = (self.next_batch, std::mem::take(&mut self.bytes));
        self.next_batch += 1;
        self.in_flight.insert(number);
        let body = Bytes::from(std::mem::take(&mut self.lines));
        let key = format!("client-{:032x}", rand::rng().random::<u128>());
        let (api, last_error) = (self.api.clone(), Arc::clone(&self.last_error));
        requests.spawn(async move {
            if let Err(error) = deliver(&api, body, &key, events).await {
                tracing::warn!(%error, events, "tally client gave up on a batch");
                *last_error.lock() = Some(error.to_string());
            }
            (number, events, bytes)
        });
    }

    fn finish(&mut self, (number, events, bytes): Done) {
        self.room.add_permits(bytes);
        self.api.counters().buffered(-(events as i64));
        self.in_flight.remove(&number);
        let below = self.in_flight.first().copied().unwrap_or(self.next_batch);
        self.finished.send_replace(below);
    }
}

/// Posts one batch and counts its outcome. A batch refused for invalid events (the server
/// then counts none of it) is sent again without them, under a key derived from its own,
/// when the answer lists every invalid event; the invalid ones count as failed.
async fn deliver(api: &Api, body: Bytes, key: &str, events: usize) -> Result<(), Error> {
    let counters = api.counters();
    let error = match api.post_events(body.clone(), key).await {
        Ok(ack) => {
            counters.acknowledged(ack.accepted, ack.duplicates);
            return Ok(());
        }
        Err(error) => error,
    };
    let invalid = match &error {
        Error::Refused(answer) => invalid_lines(answer),
        _ => None,
    };
    let Some(invalid) = invalid.filter(|invalid| !invalid.is_empty() && invalid.len() < events) else {
        counters.failed(events as u64);
        return Err(error);
    };
    counters.failed(invalid.len() as u64);
    let valid: Vec<u8> = body
        .split_inclusive(|&byte| byte == b'\n')
        .enumerate()
        .filter(|(index, _)| !invalid.contains(index))
        .flat_map(|(_, line)| line.iter().copied())
        .collect();
    match api.post_events(Bytes::from(valid), &format!("{key}-valid")).await {
        Ok(ack) => {
            counters.acknowledged(ack.accepted, ack.duplicates);
            Err(Error::Protocol(format!("{} invalid events were dropped: {error}", invalid.len())))
        }
        Err(retry_error) => {
            counters.failed((events - invalid.len()) as u64);
            Err(retry_error)
        }
    }
}

/// The line numbers of the invalid events an `invalid_events` answer names, if it names
/// every one of them (it lists at most the server's `field_errors_max`).
fn invalid_lines(answer: &crate::Answer) -> Option<std::collections::BTreeSet<usize>> {
    let body = answer.json().ok()?;
    if answer.status != hyper::StatusCode::BAD_REQUEST || body["error"] != "invalid_events" {
        return None;
    }
    let listed = body["errors"].as_array()?;
    if listed.len() as u64 != body["error_count"].as_u64()? {
        return None;
    }
    listed.iter().map(|error| error["index"].as_u64().map(|index| index as usize)).collect()
}
