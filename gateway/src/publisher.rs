//! Appends published events to the ingest streams, gathering the events that arrive together
//! into one stream entry (a [`Batch`]) per shard.
//!
//! Each `EVENT` still waits until its event is in the stream (or Redis refused it), as with
//! one entry per event; but the events queued while the previous append was on its way go
//! out together, a few entries in one round trip, so Redis, this gateway and the ingest
//! workers handle entries instead of events. Nothing waits for an entry to fill: a lone
//! event goes at once.

use redis::aio::ConnectionManager;
use shared::bus::{self, Batch, BusError};
use tokio::sync::{mpsc, oneshot};

/// Where a session waits to hear whether its event was appended (or why not).
type Answer = oneshot::Sender<Result<(), String>>;

/// An event waiting to be appended: its stream, its encoded [`bus::IngestRequest`], and
/// where to say how the append went.
struct Queued {
    stream: String,
    envelope: String,
    done: Answer,
}

/// The handle sessions publish through; cheap to share.
pub struct Publisher {
    queue: mpsc::UnboundedSender<Queued>,
}

impl Publisher {
    /// Starts the task that appends queued events. An entry holds at most `max_events`
    /// events in at most `max_bytes` (an event larger on its own goes alone). The queue is
    /// bounded by the sessions themselves: each has at most one event queued, since it waits
    /// for the answer.
    pub fn start(redis: ConnectionManager, max_events: usize, max_bytes: usize) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(append_loop(redis, rx, max_events.max(1), max_bytes));
        Publisher { queue }
    }

    /// Appends one encoded [`bus::IngestRequest`] to `stream`; returns once it is there, or
    /// why it is not.
    pub async fn publish(&self, stream: String, envelope: String) -> Result<(), String> {
        let (done, answer) = oneshot::channel();
        let queued = Queued {
            stream,
            envelope,
            done,
        };
        let stopped = || "the ingest publisher stopped".to_owned();
        self.queue.send(queued).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// One entry being gathered: its stream, its events' envelopes, their size, and whom to
/// answer.
struct Entry {
    stream: String,
    envelopes: Vec<String>,
    bytes: usize,
    waiting: Vec<Answer>,
}

impl Entry {
    fn new(q: Queued) -> Self {
        Entry {
            bytes: q.envelope.len(),
            stream: q.stream,
            envelopes: vec![q.envelope],
            waiting: vec![q.done],
        }
    }

    fn push(&mut self, q: Queued) {
        self.bytes += q.envelope.len();
        self.envelopes.push(q.envelope);
        self.waiting.push(q.done);
    }

    /// Whether `q` may join this entry: the entry stays within `max_events` events and its
    /// payload (the envelopes, a comma between each two and the brackets) within `max_bytes`.
    fn has_room(&self, q: &Queued, max_events: usize, max_bytes: usize) -> bool {
        let n = self.envelopes.len();
        n < max_events && self.bytes + n + 2 + q.envelope.len() <= max_bytes
    }

    /// The stream, the payload (a lone event's envelope as is, several as a [`Batch`]) and
    /// whom to answer.
    fn payload(mut self) -> (String, Vec<u8>, Vec<Answer>) {
        let payload = if self.envelopes.len() == 1 {
            self.envelopes.pop().unwrap_or_default().into_bytes()
        } else {
            let mut batch = Batch::default();
            for envelope in &self.envelopes {
                batch.push_encoded(envelope);
            }
            batch.finish().unwrap_or_default()
        };
        (self.stream, payload, self.waiting)
    }
}

/// Takes the first queued event, gathers what else is queued, appends the entries in one
/// round trip, and answers every event with its entry's result. When the round trip fails,
/// the events queued meanwhile get the same answer at once rather than each waiting for
/// Redis in turn.
async fn append_loop(
    mut redis: ConnectionManager,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    max_events: usize,
    max_bytes: usize,
) {
    while let Some(first) = rx.recv().await {
        let entries: Vec<_> = gather(first, &mut rx, max_events, max_bytes)
            .into_iter()
            .map(Entry::payload)
            .collect();
        let adds: Vec<(&str, &[u8])> = entries
            .iter()
            .map(|(stream, payload, _)| (stream.as_str(), payload.as_slice()))
            .collect();
        let added = bus::add_entries(&mut redis, &adds)
            .await
            .map(|each| {
                each.into_iter()
                    .map(|r| r.map_err(|e: BusError| e.to_string()))
                    .collect()
            })
            .map_err(|e| e.to_string());
        if let Err(e) = &added {
            while let Ok(q) = rx.try_recv() {
                let _ = q.done.send(Err(e.clone()));
            }
        }
        answer(entries.into_iter().map(|(_, _, waiting)| waiting), added);
    }
}

/// Tells the events of each entry how their append went: the entry's own result when the
/// round trip went through (`added`, one per entry, in order), else the round trip's error.
fn answer(
    entries: impl ExactSizeIterator<Item = Vec<Answer>>,
    added: Result<Vec<Result<(), String>>, String>,
) {
    let each = added.unwrap_or_else(|e| vec![Err(e); entries.len()]);
    debug_assert_eq!(each.len(), entries.len(), "one result per entry");
    for (waiting, result) in entries.zip(each) {
        for done in waiting {
            // The session may be gone; then nobody waits for the answer.
            let _ = done.send(result.clone());
        }
    }
}

/// `first` and every event queued behind it, as entries in order of first appearance: one
/// open entry per stream, sealed when the next event does not fit and followed by a new
/// one. The queue holds at most one event per session, so this is bounded.
fn gather(
    first: Queued,
    rx: &mut mpsc::UnboundedReceiver<Queued>,
    max_events: usize,
    max_bytes: usize,
) -> Vec<Entry> {
    let mut entries: Vec<Entry> = Vec::new();
    let mut next = Some(first);
    while let Some(q) = next {
        let open = entries
            .iter_mut()
            .rev()
            .find(|e| e.stream == q.stream)
            .filter(|e| e.has_room(&q, max_events, max_bytes));
        match open {
            Some(entry) => entry.push(q),
            None => entries.push(Entry::new(q)),
        }
        next = rx.try_recv().ok();
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(stream: &str, envelope: &str) -> (Queued, oneshot::Receiver<Result<(), String>>) {
        let (done, answer) = oneshot::channel();
        let q = Queued {
            stream: stream.into(),
            envelope: envelope.into(),
            done,
        };
        (q, answer)
    }

    /// Queues `items` behind a first one and gathers; returns each entry's stream and payload.
    fn gathered(
        items: &[(&str, &str)],
        max_events: usize,
        max_bytes: usize,
    ) -> Vec<(String, String)> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut answers = Vec::new();
        for (stream, envelope) in &items[1..] {
            let (q, answer) = queued(stream, envelope);
            answers.push(answer);
            tx.send(q).expect("receiver open");
        }
        let (first, _answer) = queued(items[0].0, items[0].1);
        gather(first, &mut rx, max_events, max_bytes)
            .into_iter()
            .map(|e| {
                let (stream, payload, _) = e.payload();
                (stream, String::from_utf8(payload).expect("utf-8"))
            })
            .collect()
    }

    #[test]
    fn each_event_is_told_its_own_entry_s_result() {
        let (senders, mut receivers): (Vec<Answer>, Vec<_>) =
            (0..4).map(|_| oneshot::channel()).unzip();
        let mut senders = senders.into_iter();
        let mut take = |n| senders.by_ref().take(n).collect::<Vec<_>>();
        let entries = vec![take(2), take(1), take(1)];
        let added = Ok(vec![Ok(()), Err("WRONGTYPE".to_owned()), Ok(())]);
        answer(entries.into_iter(), added);
        let got: Vec<_> = receivers
            .iter_mut()
            .map(|r| r.try_recv().expect("answered"))
            .collect();
        let refused = Err("WRONGTYPE".to_owned());
        assert_eq!(got, vec![Ok(()), Ok(()), refused, Ok(())]);

        // A lost round trip fails every entry.
        let (done, mut answer_rx) = oneshot::channel();
        let (done2, mut answer_rx2) = oneshot::channel();
        answer(
            vec![vec![done], vec![done2]].into_iter(),
            Err("gone".into()),
        );
        assert_eq!(answer_rx.try_recv().expect("answered"), Err("gone".into()));
        assert_eq!(answer_rx2.try_recv().expect("answered"), Err("gone".into()));
    }

    #[test]
    fn a_lone_event_is_its_own_entry() {
        let got = gathered(&[("s:0", r#"{"a":1}"#)], 32, 1 << 20);
        assert_eq!(got, vec![("s:0".into(), r#"{"a":1}"#.into())]);
    }

    #[test]
    fn queued_events_share_one_entry_per_stream_in_order() {
        let items = [
            ("s:0", "{\"a\":1}"),
            ("s:1", "{\"b\":1}"),
            ("s:0", "{\"a\":2}"),
            ("s:0", "{\"a\":3}"),
        ];
        let got = gathered(&items, 32, 1 << 20);
        assert_eq!(
            got,
            vec![
                ("s:0".into(), r#"[{"a":1},{"a":2},{"a":3}]"#.into()),
                ("s:1".into(), r#"{"b":1}"#.into()),
            ]
        );
        // Each entry reads back as the events in it, in order.
        let read: Vec<serde_json::Value> = bus::decode_batch(&got[0].1)
            .into_iter()
            .collect::<Result<_, _>>()
            .expect("decodes");
        assert_eq!(read.len(), 3);
        assert_eq!(read[2]["a"], 3);
    }

    #[test]
    fn a_full_entry_is_followed_by_a_new_one() {
        let items = [
            ("s:0", "{}"),
            ("s:0", "{}"),
            ("s:0", "{}"),
            ("s:1", "{}"),
            ("s:0", "{}"),
        ];
        let got = gathered(&items, 2, 1 << 20);
        let two = || ("s:0".to_owned(), "[{},{}]".to_owned());
        let one = |s: &str| (s.to_owned(), "{}".to_owned());
        assert_eq!(got, vec![two(), two(), one("s:1")]);
        let got = gathered(&items, 1, 1 << 20);
        assert_eq!(
            got,
            vec![one("s:0"), one("s:0"), one("s:0"), one("s:1"), one("s:0")]
        );
        // "[{},{}]" is 7 bytes: a bound of 7 keeps two events to an entry, 6 only one.
        let got = gathered(&items, 32, 7);
        assert_eq!(got, vec![two(), two(), one("s:1")]);
        let got = gathered(&items, 32, 6);
        assert_eq!(
            got,
            vec![one("s:0"), one("s:0"), one("s:0"), one("s:1"), one("s:0")]
        );
        // An event larger than the bound still goes, on its own.
        let big = [("s:0", "{\"big\":1}"), ("s:0", "{}")];
        let got = gathered(&big, 32, 3);
        assert_eq!(got, vec![("s:0".into(), "{\"big\":1}".into()), one("s:0")]);
    }
}
