//! The canonical event log: one line per input delivered to the dispatcher, per command it
//! emits, per timer firing, and per world event (arrivals, reclaims, restarts). The log is hashed
//! with FNV-1a 64 as it is written (a specified algorithm, unlike std's `DefaultHasher`), so two
//! runs can be compared by hash without keeping the log; `--log FILE` writes it out.

use std::fmt::Write as _;
use std::io::Write;

use arvados_dispatch_cloud::core::command::{Command, CommandKind, Input, poll_missing};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01B3;

/// The log and its running hash.
pub struct EventLog {
    hash: u64,
    lines: u64,
    out: Option<Box<dyn Write>>,
    buf: String,
}

impl EventLog {
    /// A log that writes to `out` if given.
    pub fn new(out: Option<Box<dyn Write>>) -> EventLog {
        EventLog {
            hash: FNV_OFFSET,
            lines: 0,
            out,
            buf: String::with_capacity(256),
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
        self.buf.push('\n');
        for b in self.buf.bytes() {
            self.hash ^= u64::from(b);
            self.hash = self.hash.wrapping_mul(FNV_PRIME);
        }
        self.lines += 1;
        if let Some(out) = self.out.as_mut() {
            // A failing log file must not change the run; the error shows at flush.
            let _ = out.write_all(self.buf.as_bytes());
        }
        self.buf.clear();
    }

    /// A free-form world line.
    pub fn line(&mut self, now: u64, text: &str) {
        let _ = write!(self.buf, "{now} {text}");
        self.emit();
    }

    /// A timer firing.
    pub fn timer(&mut self, now: u64) {
        let _ = write!(self.buf, "{now} T");
        self.emit();
    }

    /// A command the dispatcher emitted.
    pub fn command(&mut self, now: u64, c: &Command) {
        let b = &mut self.buf;
        let _ = write!(b, "{now} C {} ", c.op.0);
        let _ = match &c.kind {
            CommandKind::PollQueue { tracked } => {
                let missing = poll_missing(tracked).count();
                write!(b, "Poll known={} missing={missing}", tracked.len())
            }
            CommandKind::Lock { uuid } => write!(b, "Lock {uuid}"),
            CommandKind::Unlock { uuid } => write!(b, "Unlock {uuid}"),
            CommandKind::Cancel { uuid } => write!(b, "Cancel {uuid}"),
            CommandKind::CancelUnsatisfiable { uuid, .. } => {
                write!(b, "CancelUnsatisfiable {uuid}")
            }
            CommandKind::Create {
                instance_type,
                tags,
                ..
            } => {
                write!(b, "Create {} tags={}", instance_type.name, tags.len())
            }
            CommandKind::Destroy { instance } => write!(b, "Destroy {instance}"),
            CommandKind::ListInstances { .. } => write!(b, "List"),
            CommandKind::SetTags { instance, tags } => {
                write!(b, "SetTags {instance} n={}", tags.len())
            }
            CommandKind::Exec {
                instance, command, ..
            } => write!(b, "Exec {instance} {command}"),
        };
        self.emit();
    }

    /// An input delivered to the dispatcher.
    pub fn input(&mut self, now: u64, i: &Input) {
        let b = &mut self.buf;
        let _ = write!(b, "{now} I ");
        let ok = |r: bool| if r { "ok" } else { "err" };
        let _ = match i {
            Input::QueuePolled { op, result } => match result {
                Ok(r) => write!(
                    b,
                    "{} Polled n={} deleted={}",
                    op.0,
                    r.containers.len(),
                    r.deleted.len()
                ),
                Err(e) => write!(b, "{} Polled err {e}", op.0),
            },
            Input::ContainerUpdated { op, result } => match result {
                Ok(u) => write!(b, "{} Updated {}", op.0, u.state),
                Err(e) => write!(b, "{} Updated err {e}", op.0),
            },
            Input::UnsatisfiableCancelled { op, result } => {
                write!(b, "{} UnsatCancelled {}", op.0, ok(result.is_ok()))
            }
            Input::CreateFinished { op, result } => match result {
                Ok(info) => write!(b, "{} Created {}", op.0, info.id),
                Err(e) => write!(b, "{} Created err {:?} {e}", op.0, e.kind),
            },
            Input::DestroyFinished { op, result } => {
                write!(b, "{} Destroyed {}", op.0, ok(result.is_ok()))
            }
            Input::InstancesListed { op, result } => match result {
                Ok(l) => write!(b, "{} Listed n={}", op.0, l.len()),
                Err(e) => write!(b, "{} Listed err {e}", op.0),
            },
            Input::TagsSet { op, result } => write!(b, "{} TagsSet {}", op.0, ok(result.is_ok())),
            Input::ExecFinished { op, result } => match result {
                Ok(o) => write!(b, "{} Exec ok {}", op.0, o.stdout.replace('\n', "|")),
                Err(e) => write!(b, "{} Exec err {:?}", op.0, e.kind),
            },
            Input::SshConnected { instance } => write!(b, "SshConnected {instance}"),
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
