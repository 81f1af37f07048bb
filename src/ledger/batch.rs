//! Gathers the ledger requests of many notices into one statement. A replica
//! draining a backlog sends thousands of notices a second, each of which
//! reads its user and records its accepted send; one statement each costs a
//! round trip and a wake-up apiece, which is most of the CPU such a replica
//! spends. The requests that arrive while a statement is in flight go
//! together in the next one: no timer, so a lone request waits for nothing.

use std::future::Future;
use std::sync::Mutex;

use tokio::sync::{mpsc, oneshot};

use super::store::{LedgerError, Result};

type Job<Req, Resp> = (Req, oneshot::Sender<Result<Resp>>);

/// One kind of request, run `max` at a time in one statement by `run`,
/// which answers one response per request, in order.
pub struct Batcher<Req, Resp> {
    max: usize,
    run: std::sync::Arc<dyn Fn(Vec<Req>) -> BoxFuture<Resp> + Send + Sync>,
    /// The worker's queue, started on first use (in the caller's runtime).
    tx: Mutex<Option<mpsc::UnboundedSender<Job<Req, Resp>>>>,
}

type BoxFuture<Resp> = std::pin::Pin<Box<dyn Future<Output = Result<Vec<Resp>>> + Send>>;

impl<Req: Send + 'static, Resp: Send + 'static> Batcher<Req, Resp> {
    pub fn new<F, Fut>(max: usize, run: F) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Resp>>> + Send + 'static,
    {
        Batcher {
            max,
            run: std::sync::Arc::new(move |reqs| Box::pin(run(reqs))),
            tx: Mutex::new(None),
        }
    }

    /// Runs `req` with whatever else is waiting; the statement's error goes
    /// to every request it carried.
    ///
    /// # Errors
    /// The ledger failed.
    pub async fn call(&self, req: Req) -> Result<Resp> {
        let (answer, answered) = oneshot::channel();
        self.sender().send((req, answer)).map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }

    fn sender(&self) -> mpsc::UnboundedSender<Job<Req, Resp>> {
        let mut tx = self.tx.lock().expect("not poisoned");
        match tx.as_ref() {
            Some(s) if !s.is_closed() => s.clone(),
            _ => {
                let (s, r) = mpsc::unbounded_channel();
                tokio::spawn(work(r, self.max, self.run.clone()));
                *tx = Some(s.clone());
                s
            }
        }
    }
}

fn stopped() -> LedgerError {
    LedgerError("the ledger's statement worker stopped".into())
}

async fn work<Req, Resp>(
    mut jobs: mpsc::UnboundedReceiver<Job<Req, Resp>>,
    max: usize,
    run: std::sync::Arc<dyn Fn(Vec<Req>) -> BoxFuture<Resp> + Send + Sync>,
) {
    let mut batch = Vec::with_capacity(max);
    while jobs.recv_many(&mut batch, max).await > 0 {
        let (reqs, answers): (Vec<Req>, Vec<_>) = batch.drain(..).unzip();
        let n = reqs.len();
        match run(reqs).await {
            Ok(resps) if resps.len() == n => {
                for (answer, resp) in answers.into_iter().zip(resps) {
                    let _ = answer.send(Ok(resp));
                }
            }
            Ok(resps) => {
                let e = LedgerError(format!(
                    "a batched statement answered {} rows for {n} requests",
                    resps.len()
                ));
                for answer in answers {
                    let _ = answer.send(Err(e.clone()));
                }
            }
            Err(e) => {
                for answer in answers {
                    let _ = answer.send(Err(e.clone()));
                }
            }
        }
    }
}
