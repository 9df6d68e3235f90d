//! One remote command on one session channel: environment requests, `exec`, stdin written
//! concurrently with reading stdout and stderr, then the exit status.
//!
//! Invariants: everything here is bounded by the caller's deadline; at the deadline the channel
//! is closed (in the background, so the caller returns at once). Output buffers are capped at
//! [`MAX_OUTPUT`] bytes each; the rest is read and dropped so the remote never blocks.

use russh::client::{self, Msg};
use russh::{Channel, ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Sig};
use tokio::time::{Instant, timeout, timeout_at};

use super::{CLOSE_GRACE, ClientHandler, ExecOutput, SshError};

/// The most stdout (and, separately, stderr) kept from one command.
pub const MAX_OUTPUT: usize = 64 << 20;

/// Opens a session channel on `handle` before `deadline`.
pub(super) async fn open(
    handle: &client::Handle<ClientHandler>,
    address: &str,
    deadline: Instant,
) -> Result<Channel<Msg>, SshError> {
    match timeout_at(deadline, handle.channel_open_session()).await {
        Err(_) => Err(SshError::Timeout {
            address: address.to_string(),
            what: "opening an SSH session",
        }),
        Ok(Err(e)) => Err(SshError::Session {
            address: address.to_string(),
            reason: format!("cannot open a session: {e}"),
        }),
        Ok(Ok(ch)) => Ok(ch),
    }
}

/// Opens a session on `handle` and runs `command` on it.
pub(super) async fn run(
    handle: &client::Handle<ClientHandler>,
    address: &str,
    command: &str,
    stdin: &[u8],
    env: &[(String, String)],
    deadline: Instant,
) -> Result<ExecOutput, SshError> {
    let ch = open(handle, address, deadline).await?;
    run_channel(ch, address, command, stdin, env, deadline).await
}

/// Runs `command` on the open channel `ch`; any exit status is Ok.
pub(super) async fn run_channel(
    ch: Channel<Msg>,
    address: &str,
    command: &str,
    stdin: &[u8],
    env: &[(String, String)],
    deadline: Instant,
) -> Result<ExecOutput, SshError> {
    let (mut read, write) = ch.split();
    let result = timeout_at(
        deadline,
        drive(&mut read, &write, address, command, stdin, env),
    )
    .await;
    match result {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) => {
            if matches!(e, SshError::Session { .. }) {
                close_in_background(read, write);
            }
            Err(e)
        }
        Err(_) => {
            close_in_background(read, write);
            Err(SshError::Timeout {
                address: address.to_string(),
                what: "remote command",
            })
        }
    }
}

fn close_in_background(read: ChannelReadHalf, write: ChannelWriteHalf<Msg>) {
    tokio::spawn(async move {
        let _ = timeout(CLOSE_GRACE, write.close()).await;
        drop(read);
    });
}

fn session_error(address: &str, what: &str, e: impl std::fmt::Display) -> SshError {
    SshError::Session {
        address: address.to_string(),
        reason: format!("{what}: {e}"),
    }
}

async fn drive(
    read: &mut ChannelReadHalf,
    write: &ChannelWriteHalf<Msg>,
    address: &str,
    command: &str,
    stdin: &[u8],
    env: &[(String, String)],
) -> Result<ExecOutput, SshError> {
    for (name, value) in env {
        write
            .set_env(true, name.as_str(), value.as_str())
            .await
            .map_err(|e| session_error(address, "env request", e))?;
        // Nothing but the reply can arrive before the exec request.
        loop {
            match read.wait().await {
                Some(ChannelMsg::Success) => break,
                Some(ChannelMsg::Failure) => {
                    return Err(session_error(
                        address,
                        "env request",
                        format!("the server refused variable {name:?}"),
                    ));
                }
                Some(ChannelMsg::WindowAdjusted { .. }) => {}
                Some(_) => {}
                None => return Err(session_error(address, "env request", "channel closed")),
            }
        }
    }
    write
        .exec(true, command)
        .await
        .map_err(|e| session_error(address, "exec request", e))?;

    let writer = async {
        if !stdin.is_empty() {
            write.data(stdin).await?;
        }
        write.eof().await
    };
    tokio::pin!(writer);
    let mut writing = true;
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let mut status = None;
    let mut signal = None;
    loop {
        tokio::select! {
            // A remote that exits without reading stdin makes the write fail; that is not an
            // error of the command, so the result is ignored.
            _ = &mut writer, if writing => writing = false,
            msg = read.wait() => match msg {
                None | Some(ChannelMsg::Close) => break,
                Some(ChannelMsg::Data { data }) => append(&mut stdout, &data),
                Some(ChannelMsg::ExtendedData { data, ext: 1 }) => append(&mut stderr, &data),
                Some(ChannelMsg::ExitStatus { exit_status }) => status = Some(exit_status),
                Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                    signal = Some(signal_name_of(&signal_name));
                }
                Some(ChannelMsg::Failure) => {
                    return Err(session_error(address, "exec request", "refused by the server"));
                }
                Some(_) => {}
            },
        }
    }
    match (status, signal) {
        (Some(exit_status), _) => Ok(ExecOutput {
            stdout,
            stderr,
            exit_status,
        }),
        (None, Some(signal)) => Err(SshError::Signal {
            signal,
            stdout,
            stderr,
        }),
        (None, None) => Err(SshError::NoExitStatus {
            address: address.to_string(),
            stdout,
            stderr,
        }),
    }
}

fn append(buf: &mut Vec<u8>, data: &[u8]) {
    let room = MAX_OUTPUT.saturating_sub(buf.len());
    buf.extend_from_slice(&data[..data.len().min(room)]);
}

fn signal_name_of(sig: &Sig) -> String {
    match sig {
        Sig::Custom(name) => name.clone(),
        other => format!("{other:?}"),
    }
}
