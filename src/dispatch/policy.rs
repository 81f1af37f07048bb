//! Settlement as a pure policy: from a classified WeChat answer, what this
//! notice has been through, and the clock (passed in), to exactly one step.
//! No I/O and no clock read here, so every row of the contract's errcode
//! table — and the minute and daily quota timing — is a table test. The loop
//! in `dispatch` only carries the steps out.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::reason::Reason;
use crate::settings::Settings;
use crate::wechat::Outcome;

/// Transient failures retried in memory (within seconds) before a notice's
/// messages are parked in a retry queue.
pub const IN_MEMORY_RETRIES: u32 = 3;
/// First in-memory backoff; it grows fourfold (≈0.2 s, 0.8 s, 3.2 s; the
/// executor adds jitter).
pub const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// A token WeChat calls invalid is replaced and the call retried at once at
/// most this often per notice; then it counts as transient.
pub const TOKEN_RETRIES: u32 = 2;
/// A minute-quota pause ends this long after the minute boundary (WeChat's
/// and our clocks differ by a little).
pub const MINUTE_MARGIN: Duration = Duration::from_millis(50);

/// What to do next with a notice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Accepted: ack every delivery.
    Ack,
    /// Call again after this long; the deliveries stay held.
    RetryAfter(Duration),
    /// Pause every call of this replica for this long, then call again
    /// (`45011`: not a failed attempt of the notice).
    PauseAll(Duration),
    /// Park each delivery on its next ladder step (see [`Rules::ladder_step`]),
    /// dead-lettering with `exhausted` those past `NOTIFIER_MAX_ATTEMPTS`;
    /// with `pause`, pause every call for that long first (`45009`).
    Park {
        exhausted: Reason,
        pause: Option<Duration>,
    },
    /// Dead-letter every delivery with this reason.
    DeadLetter(Reason),
    /// A configuration fault: keep the deliveries, call nothing but one retry
    /// of this notice every `NOTIFIER_CONFIG_RETRY`, report not ready.
    Hold,
}

/// Where one delivery goes when its notice is parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Park {
    /// The retry queue of this delay, with this attempts count.
    Retry { delay: Duration, attempts: i64 },
    /// Past `NOTIFIER_MAX_ATTEMPTS`: the dead-letter queue, with this attempts count.
    Exhausted { attempts: i64 },
}

/// What a notice has been through in this replica's memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tries {
    pub transient: u32,
    pub token: u32,
}

/// The settings the policy reads.
#[derive(Debug, Clone)]
pub struct Rules {
    pub ladder: Vec<Duration>,
    pub max_attempts: u32,
}

impl Rules {
    pub fn from_settings(s: &Settings) -> Rules {
        Rules {
            ladder: s.retry_delays.clone(),
            max_attempts: s.max_attempts,
        }
    }

    /// The ladder step for a notice whose messages already failed `attempts`
    /// rounds (the last step repeats).
    pub fn rung(&self, attempts: i64) -> Duration {
        let i = usize::try_from(attempts.max(0)).unwrap_or(usize::MAX);
        self.ladder[i.min(self.ladder.len() - 1)]
    }

    /// One step for a notice after `outcome`. `prior_attempts` is the most
    /// failed rounds any of its messages carries (from retry queues); `tries`
    /// is updated for the retries this step implies.
    pub fn decide(
        &self,
        outcome: Outcome,
        prior_attempts: i64,
        tries: &mut Tries,
        now: SystemTime,
    ) -> Step {
        match outcome {
            Outcome::Delivered => Step::Ack,
            Outcome::TokenInvalid if tries.token < TOKEN_RETRIES => {
                tries.token += 1;
                Step::RetryAfter(Duration::ZERO)
            }
            Outcome::Transient | Outcome::TokenInvalid => {
                if tries.transient < IN_MEMORY_RETRIES {
                    let backoff = FIRST_BACKOFF * 4u32.pow(tries.transient);
                    tries.transient += 1;
                    Step::RetryAfter(backoff)
                } else {
                    Step::Park {
                        exhausted: Reason::RetriesExhausted,
                        pause: None,
                    }
                }
            }
            // Every time it comes, and never a failed attempt.
            Outcome::MinuteQuota => Step::PauseAll(until_next_minute(now)),
            // The pause grows with the notice's rounds on the ladder.
            Outcome::DailyQuota => Step::Park {
                exhausted: Reason::RetriesExhausted,
                pause: Some(self.rung(prior_attempts)),
            },
            Outcome::FunctionFailed => Step::Park {
                exhausted: Reason::FunctionFailed,
                pause: None,
            },
            Outcome::Rejected => Step::DeadLetter(Reason::WechatRejected),
            Outcome::NoOpenid => Step::DeadLetter(Reason::NoOpenid),
            Outcome::ConfigFault => Step::Hold,
        }
    }

    /// The retry queue a window is parked in while every call is paused for
    /// `left` more: the longest step that ends within the pause (the window
    /// comes back no later than needed, and is parked again if the pause
    /// still has long to run), or the shortest step if none does.
    pub fn rung_for_pause(&self, left: Duration) -> Duration {
        self.ladder
            .iter()
            .copied()
            .filter(|d| *d <= left)
            .max()
            .or_else(|| self.ladder.iter().copied().min())
            .expect("the ladder has at least one step")
    }

    /// Where a parked delivery that failed `attempts` rounds before goes now.
    /// Overflow-safe for any header value.
    pub fn ladder_step(&self, attempts: i64) -> Park {
        let attempts = attempts.max(0).saturating_add(1);
        if attempts >= i64::from(self.max_attempts) {
            Park::Exhausted { attempts }
        } else {
            Park::Retry {
                delay: self.rung(attempts - 1),
                attempts,
            }
        }
    }
}

/// How long until the next wall-clock minute starts (WeChat's minute quota
/// resets then), plus a small margin.
pub fn until_next_minute(now: SystemTime) -> Duration {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let into = Duration::from_nanos((since.as_nanos() % 60_000_000_000) as u64);
    Duration::from_secs(60) - into + MINUTE_MARGIN
}

/// Whether an event that happened at `occurred_at` is too old to send at `now`.
pub fn is_expired(
    occurred_at: chrono::DateTime<chrono::FixedOffset>,
    now: chrono::DateTime<chrono::Utc>,
    max_age: Duration,
) -> bool {
    let max_age = chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX);
    now.signed_duration_since(occurred_at) > max_age
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wechat::classify;

    fn rules() -> Rules {
        Rules {
            ladder: vec![
                Duration::from_secs(5),
                Duration::from_secs(30),
                Duration::from_secs(120),
            ],
            max_attempts: 10,
        }
    }

    /// `secs_into_minute` past a whole minute of 2026-11-25.
    fn at(secs_into_minute: f64) -> SystemTime {
        let minute = 1_795_615_380u64; // a whole minute
        assert_eq!(minute % 60, 0);
        UNIX_EPOCH + Duration::from_secs(minute) + Duration::from_secs_f64(secs_into_minute)
    }

    fn first(code: i64) -> Step {
        rules().decide(classify(code), 0, &mut Tries::default(), at(27.25))
    }

    const PARK: Step = Step::Park {
        exhausted: Reason::RetriesExhausted,
        pause: None,
    };

    #[test]
    fn every_row_of_the_errcode_table_gives_its_step() {
        let table: &[(&[i64], Step)] = &[
            (&[0], Step::Ack),
            (
                &[40001, 40014, 41001, 42001],
                Step::RetryAfter(Duration::ZERO),
            ),
            (
                &[-1, -1000, -501001, -501002, -501003, -501004, 43108],
                Step::RetryAfter(FIRST_BACKOFF),
            ),
            (
                &[45011],
                Step::PauseAll(Duration::from_millis(32_750) + MINUTE_MARGIN),
            ),
            (
                &[45009],
                Step::Park {
                    exhausted: Reason::RetriesExhausted,
                    pause: Some(Duration::from_secs(5)),
                },
            ),
            (
                &[40003, 40037, 41030, 43101, 43107, 45168, 47003],
                Step::DeadLetter(Reason::WechatRejected),
            ),
            (
                &[-504002],
                Step::Park {
                    exhausted: Reason::FunctionFailed,
                    pause: None,
                },
            ),
            (
                &[40125, 40164, -501005, -501000, 85088, -604101],
                Step::Hold,
            ),
            // Not in the table: never lose the notice, retry it.
            (&[99999, -7], Step::RetryAfter(FIRST_BACKOFF)),
        ];
        for (codes, step) in table {
            for code in *codes {
                assert_eq!(first(*code), *step, "errcode {code}");
            }
        }
        // The rows without an errcode: HTTP 5xx, timeouts, a 200 without errcode.
        let mut tries = Tries::default();
        assert_eq!(
            rules().decide(Outcome::Transient, 0, &mut tries, at(0.0)),
            Step::RetryAfter(FIRST_BACKOFF)
        );
        assert_eq!(
            rules().decide(Outcome::NoOpenid, 0, &mut Tries::default(), at(0.0)),
            Step::DeadLetter(Reason::NoOpenid)
        );
    }

    #[test]
    fn transient_failures_back_off_in_memory_then_park() {
        let r = rules();
        let mut tries = Tries::default();
        let steps: Vec<Step> = (0..4)
            .map(|_| r.decide(Outcome::Transient, 0, &mut tries, at(0.0)))
            .collect();
        assert_eq!(
            steps,
            vec![
                Step::RetryAfter(Duration::from_millis(200)),
                Step::RetryAfter(Duration::from_millis(800)),
                Step::RetryAfter(Duration::from_millis(3200)),
                PARK,
            ]
        );
    }

    #[test]
    fn a_bad_token_is_replaced_twice_then_counts_as_transient() {
        let r = rules();
        let mut tries = Tries::default();
        let mut next = || r.decide(Outcome::TokenInvalid, 0, &mut tries, at(0.0));
        assert_eq!(next(), Step::RetryAfter(Duration::ZERO));
        assert_eq!(next(), Step::RetryAfter(Duration::ZERO));
        assert_eq!(next(), Step::RetryAfter(FIRST_BACKOFF));
    }

    #[test]
    fn the_minute_quota_pauses_until_the_next_minute_every_time() {
        let r = rules();
        let mut tries = Tries::default();
        for (into, left_ms) in [(0.0, 60_000), (27.25, 32_750), (59.999, 1), (59.0, 1_000)] {
            // However often it comes, for the same notice: a pause, never a park.
            for _ in 0..5 {
                assert_eq!(
                    r.decide(Outcome::MinuteQuota, 0, &mut tries, at(into)),
                    Step::PauseAll(Duration::from_millis(left_ms) + MINUTE_MARGIN),
                    "at {into}s into the minute"
                );
            }
        }
        assert_eq!(tries, Tries::default(), "not a failed attempt");
    }

    #[test]
    fn the_daily_quota_pause_climbs_the_ladder_with_the_notices_rounds() {
        let r = rules();
        let pauses: Vec<Step> = [0, 1, 2, 3, 9, i64::MAX, -5]
            .into_iter()
            .map(|n| r.decide(Outcome::DailyQuota, n, &mut Tries::default(), at(0.0)))
            .collect();
        let park = |s| Step::Park {
            exhausted: Reason::RetriesExhausted,
            pause: Some(Duration::from_secs(s)),
        };
        assert_eq!(
            pauses,
            vec![
                park(5),
                park(30),
                park(120),
                park(120),
                park(120),
                park(120),
                park(5)
            ]
        );
    }

    #[test]
    fn the_ladder_is_overflow_safe_and_ends_in_a_dead_letter() {
        let r = rules();
        let retry = |delay, attempts| Park::Retry {
            delay: Duration::from_secs(delay),
            attempts,
        };
        assert_eq!(r.ladder_step(0), retry(5, 1));
        assert_eq!(r.ladder_step(1), retry(30, 2));
        assert_eq!(r.ladder_step(7), retry(120, 8));
        assert_eq!(r.ladder_step(8), retry(120, 9));
        assert_eq!(r.ladder_step(9), Park::Exhausted { attempts: 10 });
        assert_eq!(
            r.ladder_step(i64::MAX),
            Park::Exhausted { attempts: i64::MAX }
        );
        // A negative header is a fresh message, not one that never reaches the limit.
        assert_eq!(r.ladder_step(-5), retry(5, 1));
    }

    #[test]
    fn events_older_than_the_max_age_are_expired() {
        let occurred = chrono::DateTime::parse_from_rfc3339("2026-11-25T14:00:00+08:00").unwrap();
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-26T06:00:01Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert!(is_expired(occurred, now, Duration::from_secs(24 * 3600)));
        assert!(!is_expired(occurred, now, Duration::from_secs(25 * 3600)));
        assert!(!is_expired(occurred, now, Duration::MAX));
    }

    #[test]
    fn a_window_parked_for_a_pause_comes_back_no_later_than_the_pause_ends() {
        let r = Rules {
            ladder: vec![
                Duration::from_secs(5),
                Duration::from_secs(30),
                Duration::from_secs(120),
            ],
            max_attempts: 10,
        };
        assert_eq!(
            r.rung_for_pause(Duration::from_secs(40)),
            Duration::from_secs(30)
        );
        assert_eq!(
            r.rung_for_pause(Duration::from_secs(30)),
            Duration::from_secs(30)
        );
        assert_eq!(
            r.rung_for_pause(Duration::from_secs(600)),
            Duration::from_secs(120)
        );
        assert_eq!(
            r.rung_for_pause(Duration::from_secs(3)),
            Duration::from_secs(5)
        );
    }
}
