use std::fs;
use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use airlock_protocol::{ExitStatus, FILES_OUT_PORT};

use super::ports::file_port;
use super::*;
use crate::audit::records::{Direction, FilesDone};
use crate::audit::AuditLog;
use crate::cli::run::run_spec;
use crate::door::ports::{Port, PortServer};
use crate::door::session::{EncodedSpec, Outcome, Stage, Violation};
use crate::engine::{self, ProcessExit, Vm};
use crate::exit::Exit;
use crate::paths::TestDir;
use airlock_protocol::{read_frame, Message};

/// The guest holds its results connection open while the command runs:
/// meanwhile a second connection to the port is refused at once (closed
/// unread) and audited with its port, and the first is served to its end;
/// stopping the port server waits for it.
#[test]
fn a_file_port_refuses_a_later_connection_while_serving_the_first() {
    use std::io::Read;
    let dir = TestDir::new("file-port");
    let uds = dir.path().join("vsock");
    let (audit, memory) = AuditLog::memory(crate::audit::log::TEST_LIMITS, None);
    let (served, got) = mpsc::channel();
    let port = file_port(FILES_OUT_PORT, &uds, &audit, move |stream| {
        let mut bytes = Vec::new();
        let _ = (&*stream).read_to_end(&mut bytes);
        let _ = served.send(bytes);
        FilesDone::Failed {
            direction: Direction::Out,
            error: "test".into(),
            abandoned: None,
        }
    })
    .expect("listen");
    let server = PortServer::start(vec![port], &audit).expect("serve");
    let path = engine::port_path(&uds, FILES_OUT_PORT);
    let mut first = UnixStream::connect(&path).expect("first");
    first.write_all(b"real").expect("write");
    let mut second = UnixStream::connect(&path).expect("second");
    let _ = second.write_all(b"forged");
    second
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = [0u8; 8];
    match second.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("the second connection was not closed: {other:?}"),
    }
    let log = || String::from_utf8_lossy(&memory.bytes()).into_owned();
    let give_up = Instant::now() + Duration::from_secs(10);
    while !log().contains("control.refused") && Instant::now() < give_up {
        thread::sleep(Duration::from_millis(10));
    }
    let text = log();
    let refused = text
        .lines()
        .find(|l| l.contains("control.refused"))
        .unwrap_or_else(|| panic!("not audited while the first is served:\n{text}"));
    assert!(refused.contains("\"port\":1026"), "{refused}");
    assert!(
        got.try_recv().is_err(),
        "the first was not still being served"
    );
    drop(first);
    let bytes = got
        .recv_timeout(Duration::from_secs(10))
        .expect("served to its end");
    assert_eq!(bytes, b"real", "only the first connection's bytes are read");
    drop(server);
    assert!(log().contains("files.done"), "{}", log());
}

#[test]
fn deadlines() {
    let start = Instant::now();
    let d = Deadlines::from_start(start, Duration::from_secs(5));
    assert_eq!(d.boot, start + Duration::from_secs(5));
    assert_eq!(d.timeout, start + Duration::from_secs(5));
    let d = Deadlines::from_start(start, Duration::from_secs(300));
    assert_eq!(d.boot_limit, BOOT_DEADLINE);
    assert_eq!(d.timeout, start + Duration::from_secs(300));
}

fn session(outcome: Outcome, vm: Option<ProcessExit>) -> End {
    End::Session { outcome, vm }
}

const T: Duration = Duration::from_secs(300);

#[test]
fn a_memory_kill_is_out_of_memory_123() {
    let v = judge(
        &session(
            Outcome::OutOfMemory(ExitStatus::Exited(137)),
            Some(ProcessExit::Code(0)),
        ),
        T,
    );
    assert_eq!(v.exit.code(), 123);
    assert!(v.message.expect("says why").contains("out of memory"));
    let v = judge(
        &session(Outcome::OutOfMemory(ExitStatus::Signaled(9)), None),
        T,
    );
    assert_eq!(v.how, "out_of_memory");
    assert_eq!(v.command_status, Some(ExitStatus::Signaled(9)));
    assert_eq!(v.stopped_by, "airlock");
}

#[test]
fn the_output_limit_stops_the_run_with_125() {
    let v = judge(&session(Outcome::OutputLimit(1000), None), T);
    assert_eq!(v.exit, Exit::OutputLimit);
    assert_eq!(v.exit.code(), 125);
    assert!(v
        .message
        .expect("says why")
        .contains("--max-output-bytes (1000 bytes)"));
    assert_eq!(
        judge(&session(Outcome::OutputLimit(1), None), T).how,
        "output_limit"
    );
}

#[test]
fn judging_a_completed_command() {
    let clean = Some(ProcessExit::Code(0));
    let v = judge(&session(Outcome::Exited(ExitStatus::Exited(7)), clean), T);
    assert_eq!(
        v,
        Verdict {
            exit: Exit::Command(7),
            message: None,
            diagnostics: false,
            how: "exited",
            command_status: Some(ExitStatus::Exited(7)),
            stopped_by: "itself",
            why: "the guest powered off after the command ended".into(),
        }
    );
    let v = judge(&session(Outcome::Exited(ExitStatus::Signaled(9)), clean), T);
    assert_eq!(v.exit.code(), 137);
    let v = judge(&session(Outcome::Exited(ExitStatus::Exited(0)), None), T);
    assert_eq!(v.exit, Exit::Command(0));
    assert!(v.message.expect("warning").contains("did not power off"));
    let v = judge(
        &session(
            Outcome::Exited(ExitStatus::Exited(0)),
            Some(ProcessExit::Code(1)),
        ),
        T,
    );
    assert_eq!(v.exit, Exit::Command(0));
    assert!(v.diagnostics);
}

/// One verdict says everything the records need: who stopped the VM and
/// why (`vm.exit`), and `run.end`'s how, code and status.
#[test]
fn the_verdict_fills_vm_exit_and_run_end() {
    let cases: Vec<(End, &str, &str, &str)> = vec![
        (
            session(Outcome::Exited(ExitStatus::Signaled(9)), None),
            "signaled",
            "airlock",
            "the guest did not power off after the command ended",
        ),
        (
            session(
                Outcome::Broken(Violation::Closed {
                    stage: Stage::Running,
                }),
                Some(ProcessExit::Code(0)),
            ),
            "protocol_error",
            "itself",
            "it stopped during the control session",
        ),
        (
            session(
                Outcome::OutputClosed(io::ErrorKind::BrokenPipe.into()),
                None,
            ),
            "interrupted",
            "airlock",
            "our output was closed",
        ),
        (
            End::StoppedBeforeConnect(ProcessExit::Signal(11)),
            "boot_failure",
            "itself",
            "it stopped before the guest connected",
        ),
        (
            End::BootTimeout(Duration::from_secs(120)),
            "boot_failure",
            "airlock",
            "the guest did not connect within the boot deadline (120 s)",
        ),
        (
            End::TimedOut { booted: true },
            "timeout",
            "airlock",
            "--timeout passed",
        ),
        (
            End::Interrupted(libc::SIGTERM),
            "interrupted",
            "airlock",
            "airlock got signal 15",
        ),
        (
            End::SessionLost(ProcessExit::Code(1)),
            "protocol_error",
            "itself",
            "it stopped and the control session did not finish",
        ),
        (
            End::AuditFailed("disk full".into()),
            "audit_failure",
            "airlock",
            "the audit log could not be written",
        ),
    ];
    for (end, how, by, why) in cases {
        let v = judge(&end, T);
        assert_eq!(
            (v.how, v.stopped_by, v.why.as_str()),
            (how, by, why),
            "{end:?}"
        );
        let exit = crate::audit::records::fields(&v.vm_exit(Some(&ProcessExit::Code(0))));
        assert_eq!(exit["stopped_by"], by);
        assert_eq!(exit["why"], why);
        let record = crate::audit::records::fields(&v.run_end(crate::audit::records::Durations {
            total: 1,
            boot: None,
            command: None,
        }));
        assert_eq!(record["how"], how);
        assert_eq!(record["exit_code"], v.exit.code());
        assert_eq!(record["message"], serde_json::json!(v.message));
    }
    let end = judge(
        &session(
            Outcome::Exited(ExitStatus::Exited(3)),
            Some(ProcessExit::Code(0)),
        ),
        T,
    )
    .run_end(crate::audit::records::Durations {
        total: 1,
        boot: Some(1),
        command: Some(0),
    });
    assert_eq!(
        crate::audit::records::fields(&end)["command_status"],
        serde_json::json!({ "exited": 3 })
    );
}

#[test]
fn judging_failures() {
    let stopped = Some(ProcessExit::Code(0));
    let v = judge(
        &session(
            Outcome::Broken(Violation::Unexpected {
                kind: "RunSpec",
                stage: Stage::Running,
            }),
            None,
        ),
        T,
    );
    assert_eq!(v.exit.code(), 121);
    assert_eq!(
        v.message.as_deref(),
        Some("guest protocol error: unexpected RunSpec message while the command ran")
    );
    assert!(!v.diagnostics);

    let v = judge(
        &session(
            Outcome::Broken(Violation::Closed {
                stage: Stage::Running,
            }),
            stopped,
        ),
        T,
    );
    assert_eq!(v.exit.code(), 121);
    assert!(v.diagnostics);
    assert!(v
        .message
        .expect("line")
        .contains("(the VM process ended with exit status 0)"));

    let v = judge(
        &session(
            Outcome::Broken(Violation::Closed {
                stage: Stage::BeforeHello,
            }),
            stopped,
        ),
        T,
    );
    assert_eq!(v.exit.code(), 120);

    let failed = |status| {
        judge(
            &session(
                Outcome::SpawnFailed {
                    message: "no such file".into(),
                    status,
                },
                None,
            ),
            T,
        )
    };
    let v = failed(None);
    assert_eq!(v.exit.code(), 127);
    assert!(v.message.expect("line").ends_with("no such file"));
    assert_eq!(failed(Some(ExitStatus::Exited(126))).exit.code(), 126);
    assert_eq!(failed(Some(ExitStatus::Exited(0))).exit.code(), 127);

    let v = judge(
        &session(
            Outcome::OutputClosed(io::ErrorKind::BrokenPipe.into()),
            None,
        ),
        T,
    );
    assert_eq!(v.exit.code(), 141);

    let v = judge(&End::StoppedBeforeConnect(ProcessExit::Signal(11)), T);
    assert_eq!(v.exit.code(), 120);
    assert!(v
        .message
        .expect("line")
        .contains("signal 11 before the guest connected"));
    assert!(v.diagnostics);

    let v = judge(&End::BootTimeout(Duration::from_secs(120)), T);
    assert_eq!(v.exit.code(), 120);
    assert!(v.message.expect("line").contains("within 120 s"));

    let v = judge(&End::TimedOut { booted: true }, Duration::from_secs(5));
    assert_eq!(v.exit.code(), 124);
    assert!(!v.diagnostics);
    assert_eq!(
        v.message.as_deref(),
        Some("error: the sandbox ran longer than --timeout 5 s and was stopped")
    );
    let v = judge(&End::TimedOut { booted: false }, Duration::from_secs(5));
    assert_eq!(v.exit.code(), 124);
    assert!(v.diagnostics);
    assert!(v.message.expect("line").contains("had not connected"));

    assert_eq!(judge(&End::Interrupted(libc::SIGINT), T).exit.code(), 130);
    assert_eq!(judge(&End::Interrupted(libc::SIGTERM), T).exit.code(), 143);
    assert_eq!(
        judge(&End::SessionLost(ProcessExit::Code(0)), T)
            .exit
            .code(),
        121
    );
}

// ---- supervise(), with a shell script as the "VM" and a thread as the guest ----

fn discard() -> (Box<dyn Write>, Box<dyn Write>) {
    (Box::new(io::sink()), Box::new(io::sink()))
}

struct Harness {
    dir: TestDir,
    control: PathBuf,
    events: Receiver<Event>,
    params: SessionParams,
    _ports: PortServer,
}

impl Harness {
    fn new(name: &str) -> Harness {
        let dir = TestDir::new(name);
        let control = dir.path().join("vsock_1024");
        let listener = UnixListener::bind(&control).expect("bind");
        let (tx, events) = mpsc::channel();
        let audit = AuditLog::memory(crate::audit::log::TEST_LIMITS, None).0;
        let ports = {
            let tx = tx.clone();
            let port = Port::one(CONTROL_PORT, listener, move |a| {
                let _ = tx.send(Event::Accepted(a));
            });
            PortServer::start(vec![port], &audit).expect("port server")
        };
        let spec = run_spec(vec!["true".into()], &[], 1 << 20).expect("spec");
        Harness {
            control,
            events,
            params: SessionParams {
                spec: EncodedSpec::new(spec).expect("encodes"),
                max_output_bytes: 1 << 20,
                events: tx,
                writers: discard,
                audit,
            },
            _ports: ports,
            dir,
        }
    }

    /// A "VM" running `script`; `$OFF` is a file whose creation makes
    /// `wait_off` return (the guest "powering off").
    fn vm(&self, script: &str) -> Vm {
        let off = self.off();
        let script = format!(
            "OFF='{}'; wait_off() {{ while [ ! -e \"$OFF\" ]; do sleep 0.02; done; }}; {script}",
            off.display()
        );
        let main = engine::Process::spawn(
            "vm",
            Path::new("/bin/sh"),
            &["-c".into(), script.into()],
            &self.dir.path().join("vm.log"),
            &[],
        )
        .expect("spawn");
        Vm::new(main, Vec::new())
    }

    fn off(&self) -> PathBuf {
        self.dir.path().join("off")
    }

    /// A guest that connects, shakes hands, reads the spec, then does `then`.
    fn guest(
        &self,
        then: impl FnOnce(UnixStream, PathBuf) + Send + 'static,
    ) -> thread::JoinHandle<()> {
        let control = self.control.clone();
        let off = self.off();
        thread::spawn(move || {
            let stream = UnixStream::connect(&control).expect("connect");
            airlock_protocol::write_frame(&stream, &hello()).expect("hello");
            let mut r = &stream;
            assert!(matches!(read_frame(&mut r), Ok(Message::Hello { .. })));
            assert!(matches!(read_frame(&mut r), Ok(Message::RunSpec(_))));
            then(stream, off);
        })
    }

    fn supervise(&self, vm: &mut Vm, deadlines: Deadlines, stop: &StopSignal) -> End {
        supervise(
            vm,
            &self.events,
            &self.params,
            deadlines,
            stop,
            &mut Timings::default(),
        )
        .expect("supervise")
    }
}

fn hello() -> Message {
    Message::Hello {
        version: 1,
        capabilities: vec![],
    }
}

#[test]
fn the_power_off_grace_never_runs_far_past_the_timeout() {
    let start = Instant::now();
    let d = Deadlines::from_start(start, Duration::from_secs(100));
    // Early exit: the whole grace.
    let early = start + Duration::from_secs(10);
    assert_eq!(d.power_off_by(early), early + POWER_OFF_GRACE);
    // Just before the timeout: cut to RESULTS_GRACE past it.
    let late = start + Duration::from_secs(99);
    assert_eq!(d.power_off_by(late), d.timeout + RESULTS_GRACE);
    // Dumping guest memory keeps its whole grace.
    let dumping = Deadlines {
        power_off_grace: DUMP_GRACE,
        past_timeout: None,
        ..d
    };
    assert_eq!(dumping.power_off_by(late), late + DUMP_GRACE);
}

fn quick(timeout: Duration) -> Deadlines {
    Deadlines {
        power_off_grace: Duration::from_millis(500),
        drain: Duration::from_millis(200),
        session_end: Duration::from_secs(2),
        ..Deadlines::from_start(Instant::now(), timeout)
    }
}

fn no_signal() -> StopSignal {
    StopSignal(Arc::new(AtomicUsize::new(0)))
}

fn touch(path: &Path) {
    fs::write(path, b"").expect("touch");
}

#[test]
fn supervise_a_whole_run() {
    let h = Harness::new("sup-whole");
    let mut vm = h.vm("wait_off; exit 0");
    let guest = h.guest(|stream, off| {
        airlock_protocol::write_frame(&stream, &Message::Stdout(b"hi".to_vec())).expect("stdout");
        airlock_protocol::write_frame(&stream, &Message::Exit(ExitStatus::Exited(7)))
            .expect("exit");
        drop(stream);
        touch(&off);
    });
    let end = h.supervise(&mut vm, quick(Duration::from_secs(30)), &no_signal());
    guest.join().expect("guest");
    assert!(
        matches!(
            end,
            End::Session {
                outcome: Outcome::Exited(ExitStatus::Exited(7)),
                vm: Some(ProcessExit::Code(0))
            }
        ),
        "{end:?}"
    );
    assert_eq!(judge(&end, T).exit.code(), 7);
}

#[test]
fn supervise_the_guest_keeps_the_connection_after_powering_off() {
    // As vhost-device-vsock may: the VM process is gone, the socket is not.
    let h = Harness::new("sup-keep");
    let mut vm = h.vm("wait_off; exit 0");
    let guest = h.guest(|stream, off| {
        airlock_protocol::write_frame(&stream, &Message::Exit(ExitStatus::Exited(0)))
            .expect("exit");
        touch(&off);
        thread::sleep(Duration::from_secs(3));
        drop(stream);
    });
    let start = Instant::now();
    let end = h.supervise(&mut vm, quick(Duration::from_secs(30)), &no_signal());
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "waited for the socket"
    );
    guest.join().expect("guest");
    assert!(
        matches!(
            end,
            End::Session {
                outcome: Outcome::Exited(ExitStatus::Exited(0)),
                vm: Some(ProcessExit::Code(0))
            }
        ),
        "{end:?}"
    );
}

#[test]
fn supervise_the_vm_stops_before_the_guest_connects() {
    let h = Harness::new("sup-noboot");
    let mut vm = h.vm("exit 3");
    let end = h.supervise(&mut vm, quick(Duration::from_secs(30)), &no_signal());
    assert!(
        matches!(end, End::StoppedBeforeConnect(ProcessExit::Code(3))),
        "{end:?}"
    );
    assert_eq!(judge(&end, T).exit.code(), 120);
}

#[test]
fn supervise_the_vm_stops_in_the_middle_of_the_command() {
    let h = Harness::new("sup-crash");
    let mut vm = h.vm("wait_off; exit 0");
    let guest = h.guest(|stream, off| {
        touch(&off);
        thread::sleep(Duration::from_secs(3));
        drop(stream);
    });
    let end = h.supervise(&mut vm, quick(Duration::from_secs(30)), &no_signal());
    guest.join().expect("guest");
    assert!(
        matches!(
            end,
            End::Session {
                outcome: Outcome::Broken(Violation::Closed {
                    stage: Stage::Running
                }),
                vm: Some(ProcessExit::Code(0))
            }
        ),
        "{end:?}"
    );
    assert_eq!(judge(&end, T).exit.code(), 121);
}

#[test]
fn supervise_garbage_ends_the_run_at_once() {
    let h = Harness::new("sup-garbage");
    let mut vm = h.vm("exec sleep 30");
    let control = h.control.clone();
    let guest = thread::spawn(move || {
        let mut stream = UnixStream::connect(&control).expect("connect");
        stream.write_all(b"\xff\xff\xff\xffgarbage").expect("write");
        thread::sleep(Duration::from_secs(1));
    });
    let end = h.supervise(&mut vm, quick(Duration::from_secs(30)), &no_signal());
    vm.kill().expect("kill");
    guest.join().expect("guest");
    assert!(
        matches!(
            end,
            End::Session {
                outcome: Outcome::Broken(Violation::Frame {
                    stage: Stage::BeforeHello,
                    ..
                }),
                vm: None
            }
        ),
        "{end:?}"
    );
    assert_eq!(judge(&end, T).exit.code(), 121);
}

#[test]
fn supervise_a_vm_process_dying_with_its_connection_is_reported() {
    // The VMM killed by its seccomp filter: the connection breaks a
    // moment before the process is gone.
    let h = Harness::new("sup-dying");
    let mut vm = h.vm("sleep 0.1; kill -SYS $$");
    let control = h.control.clone();
    let guest = thread::spawn(move || {
        let mut stream = UnixStream::connect(&control).expect("connect");
        stream.write_all(b"\xff\xff\xff\xffgarbage").expect("write");
    });
    let end = h.supervise(&mut vm, quick(Duration::from_secs(30)), &no_signal());
    let _ = vm.kill();
    guest.join().expect("guest");
    assert!(
        matches!(
            end,
            End::Session {
                outcome: Outcome::Broken(_),
                vm: Some(ProcessExit::Signal(31))
            }
        ),
        "{end:?}"
    );
    let v = judge(&end, T);
    assert_eq!(v.exit.code(), 121);
    assert!(v.message.expect("why").contains("signal 31"));
    assert!(v.diagnostics, "the VM's log is shown");
}

#[test]
fn supervise_a_guest_that_never_powers_off() {
    let h = Harness::new("sup-nooff");
    let mut vm = h.vm("exec sleep 30");
    let guest = h.guest(|stream, _| {
        airlock_protocol::write_frame(&stream, &Message::Exit(ExitStatus::Exited(5)))
            .expect("exit");
        thread::sleep(Duration::from_secs(3));
    });
    let end = h.supervise(&mut vm, quick(Duration::from_secs(30)), &no_signal());
    guest.join().expect("guest");
    assert!(
        matches!(
            end,
            End::Session {
                outcome: Outcome::Exited(ExitStatus::Exited(5)),
                vm: None
            }
        ),
        "{end:?}"
    );
    assert_eq!(judge(&end, T).exit.code(), 5);
}

#[test]
fn supervise_deadlines_and_signals() {
    let h = Harness::new("sup-deadlines");
    let mut vm = h.vm("exec sleep 30");
    let end = h.supervise(&mut vm, quick(Duration::from_millis(300)), &no_signal());
    assert!(matches!(end, End::TimedOut { booted: false }), "{end:?}");
    vm.kill().expect("kill");

    let mut vm = h.vm("exec sleep 30");
    let deadlines = Deadlines {
        boot: Instant::now() + Duration::from_millis(300),
        ..quick(Duration::from_secs(30))
    };
    let end = h.supervise(&mut vm, deadlines, &no_signal());
    assert!(matches!(end, End::BootTimeout(_)), "{end:?}");
    vm.kill().expect("kill");

    let mut vm = h.vm("exec sleep 30");
    let stop = StopSignal(Arc::new(AtomicUsize::new(15)));
    let end = h.supervise(&mut vm, quick(Duration::from_secs(30)), &stop);
    assert!(matches!(end, End::Interrupted(15)), "{end:?}");
    // The VM is already gone.
    assert_eq!(
        vm.try_wait().expect("wait"),
        Some(ProcessExit::Signal(libc::SIGKILL))
    );
}

#[test]
fn run_dir_is_private_and_removed() {
    let run_dir = RunDir::create(&ConsoleTarget::Temp { keep: false }).expect("create");
    let dir = run_dir.dir.clone();
    assert!(run_dir.console.is_file());
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(&dir).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    assert_eq!(run_dir.finish(), None);
    assert!(!dir.exists());

    let run_dir = RunDir::create(&ConsoleTarget::Temp { keep: true }).expect("create");
    let dir = run_dir.dir.clone();
    let socket = dir.join("vsock_1024");
    let _listener = UnixListener::bind(&socket).expect("bind");
    let kept = run_dir.finish().expect("kept");
    assert!(kept.is_file());
    assert!(!socket.exists(), "sockets are not kept");
    fs::remove_dir_all(dir).expect("cleanup");
}

#[test]
fn console_file_named_by_user_is_truncated_and_kept() {
    let dir = TestDir::new("userlog");
    let path = dir.path().join("c.log");
    fs::write(&path, b"stale").expect("write");
    let run_dir = RunDir::create(&ConsoleTarget::File(path.clone())).expect("create");
    let private = run_dir.dir.clone();
    assert_eq!(fs::read(&path).expect("read"), b"");
    assert_eq!(run_dir.finish(), Some(path));
    assert!(!private.exists());

    let bad = RunDir::create(&ConsoleTarget::File(dir.path().join("no/such/dir/c.log")))
        .expect_err("bad path");
    assert_eq!(bad.exit(), Exit::Usage);
}
