//! The canonical event log: one line per input delivered to the dispatcher, per command it
//! emits, per timer firing, and per world event (arrivals, reclaims, restarts). The log is hashed
//! with FNV-1a 64 as it is written (a specified algorithm, unlike std's `DefaultHasher`), so two
//! runs can be compared by hash without keeping the log; `--log FILE` writes it out.

use std::io::Write;

use arvados_dispatch_cloud::core::command::{Command, CommandKind, Input, poll_missing};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01B3;

/// The log and its running hash.
///
/// A line is assembled as bytes in `buf` (strings and decimal integers are appended directly;
/// only the rare error lines go through `fmt`), then hashed and written out in one piece. The
/// bytes are exactly what the `Display`/`Debug` formatting of the same values would give.
pub struct EventLog {
    hash: u64,
    lines: u64,
    out: Option<Box<dyn Write>>,
    buf: Vec<u8>,
}

/// The two-digit decimal strings "00" to "99", back to back.
const PAIRS: &[u8; 200] = b"\
0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

/// Appends the decimal digits of `n`, as `u64`'s `Display` writes them (two digits a step).
#[inline]
fn push_u64(b: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    while n >= 100 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        at -= 2;
        digits[at..at + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    }
    if n >= 10 {
        let pair = n as usize * 2;
        at -= 2;
        digits[at..at + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    } else {
        at -= 1;
        digits[at] = b'0' + n as u8;
    }
    b.extend_from_slice(&digits[at..]);
}

/// Appends `n` (a length) in decimal.
fn push_usize(b: &mut Vec<u8>, n: usize) {
    push_u64(b, n as u64);
}

/// Appends `s`.
fn push(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(s.as_bytes());
}

/// Starts a line: `"{now}{tag}"`.
fn push_poll(b: &mut Vec<u8>, known: usize, missing: usize) {
    push(b, "Poll known=");
    push_usize(b, known);
    push(b, " missing=");
    push_usize(b, missing);
}

fn start(b: &mut Vec<u8>, now: u64, tag: &str) {
    push_u64(b, now);
    push(b, tag);
}

/// Starts an input line after its time: `"{op} {what}"`.
fn op(b: &mut Vec<u8>, op: u64, what: &str) {
    push_u64(b, op);
    push(b, what);
}

impl EventLog {
    /// A log that writes to `out` if given.
    pub fn new(out: Option<Box<dyn Write>>) -> EventLog {
        EventLog {
            hash: FNV_OFFSET,
            lines: 0,
            out,
            buf: Vec::with_capacity(256),
        }
    }

    /// The hash of everything logged so far, as 16 hex digits.
    pub fn hash_hex(&self) -> String {
        format!("{:016x}", self.hash)
    }

    /// Lines logged.
    pub fn lines(&self) -> u64 {
        self.lines
    }

    fn emit(&mut self) {
        self.buf.push(b'\n');
        let mut hash = self.hash;
        for &b in &self.buf {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(FNV_PRIME);
        }
        self.hash = hash;
        self.lines += 1;
        if let Some(out) = self.out.as_mut() {
            // A failing log file must not change the run; the error shows at flush.
            let _ = out.write_all(&self.buf);
        }
        self.buf.clear();
    }

    /// A free-form world line.
    pub fn line(&mut self, now: u64, text: &str) {
        start(&mut self.buf, now, " ");
        push(&mut self.buf, text);
        self.emit();
    }

    /// A timer firing.
    pub fn timer(&mut self, now: u64) {
        start(&mut self.buf, now, " T");
        self.emit();
    }

    /// The line [`EventLog::command`] writes for a `PollQueue` command with id `op` and
    /// `known` tracked records, `missing` of them unfinished (`poll_missing(tracked).count()`,
    /// which the caller may know without reading every record).
    pub fn poll_command(&mut self, now: u64, op: u64, known: usize, missing: usize) {
        let b = &mut self.buf;
        start(b, now, " C ");
        push_u64(b, op);
        push(b, " ");
        push_poll(b, known, missing);
        self.emit();
    }

    /// A command the dispatcher emitted.
    pub fn command(&mut self, now: u64, c: &Command) {
        let b = &mut self.buf;
        start(b, now, " C ");
        push_u64(b, c.op.0);
        push(b, " ");
        match &c.kind {
            CommandKind::PollQueue { tracked } => {
                push_poll(b, tracked.len(), poll_missing(tracked).count());
            }
            CommandKind::Lock { uuid } => {
                push(b, "Lock ");
                push(b, uuid);
            }
            CommandKind::Unlock { uuid } => {
                push(b, "Unlock ");
                push(b, uuid);
            }
            CommandKind::Cancel { uuid } => {
                push(b, "Cancel ");
                push(b, uuid);
            }
            CommandKind::CancelUnsatisfiable { uuid, .. } => {
                push(b, "CancelUnsatisfiable ");
                push(b, uuid);
            }
            CommandKind::Create {
                instance_type,
                tags,
                ..
            } => {
                push(b, "Create ");
                push(b, &instance_type.name);
                push(b, " tags=");
                push_usize(b, tags.len());
            }
            CommandKind::Destroy { instance } => {
                push(b, "Destroy ");
                push(b, instance);
            }
            CommandKind::ListInstances { .. } => push(b, "List"),
            CommandKind::SetTags { instance, tags } => {
                push(b, "SetTags ");
                push(b, instance);
                push(b, " n=");
                push_usize(b, tags.len());
            }
            CommandKind::Exec {
                instance, command, ..
            } => {
                push(b, "Exec ");
                push(b, instance);
                push(b, " ");
                push(b, command);
            }
        }
        self.emit();
    }

    /// An input delivered to the dispatcher.
    pub fn input(&mut self, now: u64, i: &Input) {
        let b = &mut self.buf;
        start(b, now, " I ");
        let ok = |r: bool| if r { "ok" } else { "err" };
        // Writing to a `Vec` cannot fail.
        let _ = match i {
            Input::QueuePolled { op: o, result } => match result {
                Ok(r) => {
                    op(b, o.0, " Polled n=");
                    push_usize(b, r.containers.len());
                    push(b, " deleted=");
                    push_usize(b, r.deleted.len());
                    Ok(())
                }
                Err(e) => write!(b, "{} Polled err {e}", o.0),
            },
            Input::ContainerUpdated { op: o, result } => match result {
                Ok(u) => {
                    op(b, o.0, " Updated ");
                    push(b, u.state.as_str());
                    Ok(())
                }
                Err(e) => write!(b, "{} Updated err {e}", o.0),
            },
            Input::UnsatisfiableCancelled { op: o, result } => {
                op(b, o.0, " UnsatCancelled ");
                push(b, ok(result.is_ok()));
                Ok(())
            }
            Input::CreateFinished { op: o, result } => match result {
                Ok(info) => {
                    op(b, o.0, " Created ");
                    push(b, &info.id);
                    Ok(())
                }
                Err(e) => write!(b, "{} Created err {:?} {e}", o.0, e.kind),
            },
            Input::DestroyFinished { op: o, result } => {
                op(b, o.0, " Destroyed ");
                push(b, ok(result.is_ok()));
                Ok(())
            }
            Input::InstancesListed { op: o, result } => match result {
                Ok(l) => {
                    op(b, o.0, " Listed n=");
                    push_usize(b, l.len());
                    Ok(())
                }
                Err(e) => write!(b, "{} Listed err {e}", o.0),
            },
            Input::TagsSet { op: o, result } => {
                op(b, o.0, " TagsSet ");
                push(b, ok(result.is_ok()));
                Ok(())
            }
            Input::ExecFinished { op: o, result } => match result {
                Ok(out) => {
                    op(b, o.0, " Exec ok ");
                    // The output with each newline written as '|'.
                    b.extend(
                        out.stdout
                            .bytes()
                            .map(|c| if c == b'\n' { b'|' } else { c }),
                    );
                    Ok(())
                }
                Err(e) => write!(b, "{} Exec err {:?}", o.0, e.kind),
            },
            Input::SshConnected { instance } => {
                push(b, "SshConnected ");
                push(b, instance);
                Ok(())
            }
        };
        self.emit();
    }

    /// Flushes the file, if any.
    pub fn flush(&mut self) -> std::io::Result<()> {
        match self.out.as_mut() {
            Some(o) => o.flush(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::push_u64;

    #[test]
    fn integers_are_written_as_display_writes_them() {
        let mut cases: Vec<u64> = vec![0, 9, 10, 99, 100, 101, 999, 1000, u64::MAX, u64::MAX - 1];
        let mut p = 1u64;
        while let Some(next) = p.checked_mul(10) {
            cases.extend([p - 1, p, p + 1, next / 2 + 7]);
            p = next;
        }
        for n in cases {
            let mut b = b"x".to_vec();
            push_u64(&mut b, n);
            assert_eq!(b, format!("x{n}").into_bytes(), "{n}");
        }
    }
}
