//! The log lines' way to stderr: off the runtime thread, a burst in one write.
//!
//! The service has one runtime thread, and a stderr pipe that stalls (a log
//! collector that stopped reading) must not stop its heartbeats and acks; so
//! a line is only appended to a buffer in memory, and a thread of its own
//! writes. That thread wakes when the buffer stops being empty, lets the
//! burst gather for [`GATHER`], and writes all of it in one call. A busy
//! replica so costs one wake-up and one write per few milliseconds, not one
//! per line: the channel writer this replaces (`tracing-appender`) woke its
//! thread for each line, about 4 % of the replica's CPU in the drain
//! benchmark (one "notice delivered" line per ten events).
//!
//! When the writer is `max_buffered` bytes behind, new lines are dropped and
//! counted ([`LineWriter::dropped`]), as are lines whose write failed;
//! [`LineWriter::close`] writes the rest.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;

/// How long the writer thread lets lines gather after the first of a burst.
pub const GATHER: Duration = Duration::from_millis(5);

/// A buffer kept between writes is given back above this size.
const KEEP_CAPACITY: usize = 256 * 1024;

/// Where lines wait for the writer thread. Cheap to clone.
#[derive(Clone)]
pub struct LineWriter {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// The writer thread waits here for lines (or the close).
    lines_came: Condvar,
    /// `close` waits here for the writer thread to finish.
    finished: Condvar,
    max_buffered: usize,
    dropped: AtomicU64,
}

#[derive(Default)]
struct State {
    lines: Vec<u8>,
    /// How many appends `lines` holds (counted as dropped if their write fails).
    count: u64,
    closing: bool,
    finished: bool,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held leaves bytes, never a broken invariant.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LineWriter {
    /// Starts the thread `name` that writes to `out`.
    ///
    /// # Errors
    /// The thread could not be started.
    pub fn start<W: Write + Send + 'static>(
        out: W,
        max_buffered: usize,
        name: &str,
    ) -> std::io::Result<LineWriter> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            lines_came: Condvar::new(),
            finished: Condvar::new(),
            max_buffered,
            dropped: AtomicU64::new(0),
        });
        let worker = shared.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || write_out(&worker, out))?;
        Ok(LineWriter { shared })
    }

    /// Appends one line (or any bytes: one call is kept whole). Never waits
    /// for stderr; dropped and counted when the buffer is full, lost once
    /// closed.
    pub fn append(&self, line: &[u8]) {
        let mut s = self.shared.state();
        if s.finished {
            return;
        }
        if s.lines.len() + line.len() > self.shared.max_buffered {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let first = s.lines.is_empty();
        s.lines.extend_from_slice(line);
        s.count += 1;
        drop(s);
        if first {
            self.shared.lines_came.notify_one();
        }
    }

    /// Lines dropped so far: the buffer was full, or their write failed.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Writes out what is buffered, waiting at most `wait` (stderr may be
    /// stalled); later lines are lost.
    pub fn close(&self, wait: Duration) {
        let deadline = Instant::now() + wait;
        let mut s = self.shared.state();
        s.closing = true;
        self.shared.lines_came.notify_one();
        while !s.finished {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            s = self
                .shared
                .finished
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// The writer thread: a burst at a time, until closed and empty.
fn write_out<W: Write>(shared: &Shared, mut out: W) {
    let mut spare = Vec::new();
    loop {
        let mut s = shared.state();
        while s.lines.is_empty() && !s.closing {
            s = shared.lines_came.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.lines.is_empty() {
            break; // closing, and all written
        }
        if !s.closing {
            drop(s);
            std::thread::sleep(GATHER);
            s = shared.state();
        }
        std::mem::swap(&mut s.lines, &mut spare);
        let count = std::mem::take(&mut s.count);
        drop(s);
        // A write that fails (stderr closed) loses its lines, as an
        // unwritable stderr must; they count as dropped.
        if out.write_all(&spare).and_then(|()| out.flush()).is_err() {
            shared.dropped.fetch_add(count, Ordering::Relaxed);
        }
        spare.clear();
        if spare.capacity() > KEEP_CAPACITY {
            spare = Vec::new();
        }
    }
    let mut s = shared.state();
    s.finished = true;
    drop(s);
    shared.finished.notify_all();
}

impl Write for &LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LineWriter {
    type Writer = &'a LineWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink the test can read while the writer thread holds it.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_burst_leaves_in_order_in_few_writes_and_close_writes_the_rest() {
        let sink = Sink::default();
        let w = LineWriter::start(sink.clone(), 1 << 20, "test-log").unwrap();
        for i in 0..1000 {
            w.append(format!("line {i}\n").as_bytes());
        }
        w.close(Duration::from_secs(5));
        let writes = sink.0.lock().unwrap().clone();
        let text = String::from_utf8(writes.concat()).unwrap();
        let expected: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text, expected);
        // Appended faster than GATHER: far fewer writes than lines.
        assert!(writes.len() < 100, "{} writes for 1000 lines", writes.len());
        assert_eq!(w.dropped(), 0);
        // Closed: later lines are lost, not written.
        w.append(b"late\n");
        assert_eq!(sink.0.lock().unwrap().concat(), expected.as_bytes());
    }

    /// stderr closed: every write fails.
    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_whose_write_fails_count_as_dropped() {
        let w = LineWriter::start(Closed, 1 << 20, "test-log").unwrap();
        for i in 0..7 {
            w.append(format!("line {i}\n").as_bytes());
        }
        w.close(Duration::from_secs(5));
        assert_eq!(w.dropped(), 7);
    }

    /// stderr nobody reads: the writer thread is stuck in its write.
    struct Stuck(Arc<(Mutex<bool>, Condvar)>);

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (lock, cv) = &*self.0;
            let mut go = lock.lock().unwrap();
            while !*go {
                go = cv.wait(go).unwrap();
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_stderr_drops_and_counts_what_the_buffer_cannot_hold() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let w = LineWriter::start(Stuck(gate.clone()), 100, "test-log").unwrap();
        w.append(b"first line, taken by the stuck write\n");
        // Wait until the writer thread took it (the buffer is empty again).
        while !w.shared.state().lines.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        for _ in 0..10 {
            w.append(b"0123456789012345678\n"); // 20 bytes: five fit in 100
        }
        assert_eq!(w.dropped(), 5);
        assert_eq!(w.shared.state().lines.len(), 100);
        // A close that cannot finish returns after its wait.
        let t = Instant::now();
        w.close(Duration::from_millis(50));
        assert!(t.elapsed() < Duration::from_secs(5));
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
    }
}
