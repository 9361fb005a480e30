//! The message loop against a scripted fake device: requests go in through a pipe, replies,
//! ioctls and worker starts/stops are recorded in one ordered log.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{PipeReader, PipeWriter, Read, Write};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::*;

const DEADLINE: Duration = Duration::from_secs(10);
/// How far a fake worker moves its queue before it is stopped.
const ADVANCE: u16 = 7;

fn features() -> u64 {
    vf::feature_mask(vf::VIRTIO_F_VERSION_1)
        | vf::feature_mask(vf::VIRTIO_F_ACCESS_PLATFORM)
        | vf::feature_mask(vf::VIRTIO_F_EVENT_IDX)
}

/// What happened, in order.
#[derive(Debug, Clone, PartialEq)]
enum Ev {
    Reply(u::VduseDevResponse),
    KickFd {
        q: u32,
        fd: RawFd,
        eventfd: bool,
    },
    Start {
        setup: QueueSetup,
        kick: RawFd,
        cpu: Option<usize>,
    },
    StopRequested(u16),
    Stopped(u16),
    /// `QueueWorkers::reset`: what an attach set up (zero copy) is undone.
    Reset,
}

/// One item of the device's script.
enum Scripted {
    Request(u::VduseDevRequest),
    ReadError,
}

/// State shared by the fake device, the fake workers and the test.
#[derive(Default)]
struct Shared {
    log: Mutex<Vec<Ev>>,
    changed: Condvar,
    /// Exit tokens of running workers, by queue.
    tokens: Mutex<HashMap<u16, ExitToken>>,
    /// Queues whose worker reports a corrupt ring when stopped.
    broken: Mutex<HashSet<u16>>,
}

impl Shared {
    fn record(&self, ev: Ev) {
        self.log.lock().unwrap().push(ev);
        self.changed.notify_all();
    }

    fn log(&self) -> Vec<Ev> {
        self.log.lock().unwrap().clone()
    }

    /// Wait (with a deadline) until `pred` holds for the log.
    fn wait_for(&self, what: &str, pred: impl Fn(&[Ev]) -> bool) -> Vec<Ev> {
        let end = Instant::now() + DEADLINE;
        let mut log = self.log.lock().unwrap();
        while !pred(&log) {
            let now = Instant::now();
            assert!(now < end, "timed out waiting for {what}; log: {log:#?}");
            log = self.changed.wait_timeout(log, end - now).unwrap().0;
        }
        log.clone()
    }
}

struct FakeDev {
    rd: PipeReader,
    wr: Mutex<Option<PipeWriter>>,
    script: Mutex<VecDeque<Scripted>>,
    features: Mutex<Result<u64, Errno>>,
    vqs: Mutex<Vec<u::VduseVqInfo>>,
    shared: Arc<Shared>,
}

impl FakeDev {
    fn push(&self, item: Scripted) {
        self.script.lock().unwrap().push_back(item);
        let mut wr = self.wr.lock().unwrap();
        wr.as_mut().expect("pipe open").write_all(&[1]).unwrap();
    }

    /// The kernel side goes away: the pipe reports POLLHUP once drained.
    fn hang_up(&self) {
        self.wr.lock().unwrap().take();
    }
}

impl DeviceOps for FakeDev {
    fn poll_fd(&self) -> BorrowedFd<'_> {
        self.rd.as_fd()
    }

    fn read_request(&self) -> io::Result<u::VduseDevRequest> {
        let mut b = [0u8; 1];
        (&self.rd).read_exact(&mut b)?;
        match self.script.lock().unwrap().pop_front() {
            Some(Scripted::Request(r)) => Ok(r),
            Some(Scripted::ReadError) => Err(io::Error::from_raw_os_error(libc::EIO)),
            None => panic!("readable pipe without a scripted item"),
        }
    }

    fn write_response(&self, resp: &u::VduseDevResponse) -> io::Result<()> {
        self.shared.record(Ev::Reply(*resp));
        Ok(())
    }

    fn driver_features(&self) -> Result<u64, Errno> {
        *self.features.lock().unwrap()
    }

    fn vq_info(&self, index: u32) -> Result<u::VduseVqInfo, Errno> {
        self.vqs
            .lock()
            .unwrap()
            .get(index as usize)
            .copied()
            .ok_or(Errno::EINVAL)
    }

    fn set_kickfd(&self, index: u32, fd: RawFd) -> Result<(), Errno> {
        let eventfd = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
            .is_ok_and(|s| s.contains("eventfd-count"));
        self.shared.record(Ev::KickFd {
            q: index,
            fd,
            eventfd,
        });
        Ok(())
    }
}

struct FakeWorkers {
    shared: Arc<Shared>,
}

struct FakeWorker {
    setup: QueueSetup,
    _kick: OwnedFd,
    shared: Arc<Shared>,
}

impl QueueWorkers for FakeWorkers {
    type Worker = FakeWorker;

    fn start(&mut self, start: WorkerStart) -> io::Result<FakeWorker> {
        let WorkerStart {
            setup, kick, exit, ..
        } = start;
        self.shared.record(Ev::Start {
            setup,
            kick: kick.as_raw_fd(),
            cpu: start.opts.cpu,
        });
        self.shared.tokens.lock().unwrap().insert(setup.index, exit);
        Ok(FakeWorker {
            setup,
            _kick: kick,
            shared: Arc::clone(&self.shared),
        })
    }

    fn reset(&mut self) {
        self.shared.record(Ev::Reset);
    }
}

impl QueueWorker for FakeWorker {
    fn index(&self) -> u16 {
        self.setup.index
    }

    fn request_stop(&self) {
        self.shared.record(Ev::StopRequested(self.setup.index));
    }

    fn stop(self) -> Result<WorkerExit, WorkerError> {
        let q = self.setup.index;
        self.shared.tokens.lock().unwrap().remove(&q);
        self.shared.record(Ev::Stopped(q));
        let stats = QueueStats {
            reads: 1,
            ..QueueStats::default()
        };
        if self.shared.broken.lock().unwrap().contains(&q) {
            return Err(WorkerError::Broken {
                queue: q,
                reason: crate::worker::BrokenReason::InvalidAreas,
                stats: Box::new(stats),
            });
        }
        Ok(WorkerExit {
            next_avail: self.setup.next_avail.wrapping_add(ADVANCE),
            next_used: self.setup.next_used.wrapping_add(ADVANCE),
            stats,
        })
    }
}

fn vq(index: u32, num: u32, avail: u16) -> u::VduseVqInfo {
    u::VduseVqInfo {
        index,
        num,
        desc_addr: 0x1000 * u64::from(index + 1),
        driver_addr: 0x10000 * u64::from(index + 1),
        device_addr: 0x100000 * u64::from(index + 1),
        state: [avail, 0, 0, 0],
        ready: 1,
    }
}

struct Harness {
    dev: Arc<FakeDev>,
    shared: Arc<Shared>,
    events: EventReceiver,
    handle: Option<LoopHandle>,
    next_id: u32,
}

impl Harness {
    fn new(vqs: Vec<u::VduseVqInfo>, cpus: Vec<usize>) -> Self {
        let shared = Arc::new(Shared::default());
        let (rd, wr) = std::io::pipe().unwrap();
        let dev = Arc::new(FakeDev {
            rd,
            wr: Mutex::new(Some(wr)),
            script: Mutex::new(VecDeque::new()),
            features: Mutex::new(Ok(features())),
            shared: Arc::clone(&shared),
            vqs: Mutex::new(vqs.clone()),
        });
        let cfg = LoopConfig {
            name: "fake".into(),
            num_queues: vqs.len() as u16,
            max_queue_size: 256,
            offered_features: features(),
            cpus,
            poll: Duration::ZERO,
            live: None,
            stage_stats: true,
        };
        let (tx, events) = event_channel().unwrap();
        let workers = FakeWorkers {
            shared: Arc::clone(&shared),
        };
        let handle = spawn_loop(Arc::clone(&dev), workers, cfg, tx).unwrap();
        Harness {
            dev,
            shared,
            events,
            handle: Some(handle),
            next_id: 100,
        }
    }

    /// Send a request and wait for its reply; returns the reply and the log up to it.
    fn send(&mut self, req_type: u32, payload: &[u32]) -> (u::VduseDevResponse, Vec<Ev>) {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = u::VduseDevRequest {
            req_type,
            request_id: id,
            ..Default::default()
        };
        req.payload[..payload.len()].copy_from_slice(payload);
        self.dev.push(Scripted::Request(req));
        let is_mine = |e: &Ev| matches!(e, Ev::Reply(r) if r.request_id == id);
        let log = self
            .shared
            .wait_for("a reply", |log| log.iter().any(is_mine));
        let at = log.iter().position(is_mine).unwrap();
        let Ev::Reply(r) = log[at] else {
            unreachable!()
        };
        (r, log[..at].to_vec())
    }

    fn status(&mut self, status: u8) -> (u32, Vec<Ev>) {
        let (r, log) = self.send(u::VDUSE_SET_STATUS, &[u32::from(status)]);
        (r.result, log)
    }

    /// A harness over `vqs` (no CPUs given), brought up to DRIVER_OK.
    fn running(vqs: Vec<u::VduseVqInfo>) -> Self {
        let mut h = Self::new(vqs, vec![]);
        h.bring_up();
        h
    }

    /// ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK, each answered OK.
    fn bring_up(&mut self) {
        for s in [
            vf::STATUS_ACKNOWLEDGE,
            vf::STATUS_ACKNOWLEDGE | vf::STATUS_DRIVER,
            vf::STATUS_ACKNOWLEDGE | vf::STATUS_DRIVER | vf::STATUS_FEATURES_OK,
            DRIVER_OK_STATUS,
        ] {
            assert_eq!(self.status(s).0, u::VDUSE_REQ_RESULT_OK, "status {s:#x}");
        }
    }

    /// Events recorded after the first `n`.
    fn since(&self, n: usize) -> Vec<Ev> {
        self.shared.log()[n..].to_vec()
    }

    fn len(&self) -> usize {
        self.shared.log.lock().unwrap().len()
    }

    /// Wait (with a deadline) for the loop's next event, through its eventfd.
    fn next_event(&self) -> LoopEvent {
        let end = Instant::now() + DEADLINE;
        loop {
            self.events.clear();
            if let Some(ev) = self.events.try_recv() {
                return ev;
            }
            let left = end.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no loop event within the deadline");
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(self.events.as_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(ms)).unwrap();
        }
    }

    fn stop(mut self) -> QueueStats {
        self.handle.take().unwrap().stop()
    }
}

const DRIVER_OK_STATUS: u8 =
    vf::STATUS_ACKNOWLEDGE | vf::STATUS_DRIVER | vf::STATUS_FEATURES_OK | vf::STATUS_DRIVER_OK;

fn starts(log: &[Ev]) -> Vec<QueueSetup> {
    log.iter()
        .filter_map(|e| match e {
            Ev::Start { setup, .. } => Some(*setup),
            _ => None,
        })
        .collect()
}

#[test]
fn features_ok_with_unknown_or_missing_features_is_refused() {
    let mut h = Harness::new(vec![vq(0, 256, 0)], vec![]);
    let fok = vf::STATUS_ACKNOWLEDGE | vf::STATUS_DRIVER | vf::STATUS_FEATURES_OK;
    assert_eq!(h.status(vf::STATUS_ACKNOWLEDGE).0, u::VDUSE_REQ_RESULT_OK);
    *h.dev.features.lock().unwrap() = Ok(features() | vf::feature_mask(50));
    assert_eq!(h.status(fok).0, u::VDUSE_REQ_RESULT_FAILED);
    *h.dev.features.lock().unwrap() = Ok(vf::feature_mask(vf::VIRTIO_F_VERSION_1));
    assert_eq!(h.status(fok).0, u::VDUSE_REQ_RESULT_FAILED);
    *h.dev.features.lock().unwrap() = Err(Errno::EPERM);
    assert_eq!(h.status(fok).0, u::VDUSE_REQ_RESULT_FAILED);
    // A refused status did not advance: the same FEATURES_OK is checked again and accepted.
    *h.dev.features.lock().unwrap() = Ok(features());
    assert_eq!(h.status(fok).0, u::VDUSE_REQ_RESULT_OK);
    assert!(starts(&h.shared.log()).is_empty());
    h.stop();
}

#[test]
fn driver_ok_starts_one_worker_per_ready_queue_with_a_fresh_kick_eventfd() {
    let mut not_ready = vq(1, 256, 0);
    not_ready.ready = 0;
    let mut h = Harness::new(vec![vq(0, 256, 5), not_ready, vq(2, 128, 9)], vec![4, 5]);
    h.bring_up();
    let log = h.shared.log();
    let s = starts(&log);
    assert_eq!(s.len(), 2, "{log:#?}");
    assert_eq!(
        s[0],
        QueueSetup {
            index: 0,
            size: 256,
            max_size: 256,
            desc_addr: 0x1000,
            avail_addr: 0x10000,
            used_addr: 0x100000,
            next_avail: 5,
            next_used: 5,
            event_idx: true,
        }
    );
    assert_eq!((s[1].index, s[1].size, s[1].next_avail), (2, 128, 9));
    // Each start is preceded by SETUP_KICKFD with the eventfd the worker then owns.
    for q in [0u16, 2] {
        let at = log
            .iter()
            .position(|e| matches!(e, Ev::Start { setup, .. } if setup.index == q))
            .unwrap();
        let Ev::Start { kick, cpu, .. } = log[at] else {
            unreachable!()
        };
        assert_eq!(
            log[at - 1],
            Ev::KickFd {
                q: u32::from(q),
                fd: kick,
                eventfd: true
            }
        );
        // Round robin over the CPU list by queue index.
        assert_eq!(cpu, Some([4, 5][usize::from(q) % 2]));
    }
    // DRIVER_OK again (already running) starts nothing more.
    let n = h.len();
    assert_eq!(h.status(DRIVER_OK_STATUS).0, u::VDUSE_REQ_RESULT_OK);
    assert!(starts(&h.since(n)).is_empty());
    assert_eq!(
        h.stop().reads,
        2,
        "both workers' stats are merged at the end"
    );
}

#[test]
fn driver_ok_with_a_bad_queue_size_is_refused_and_nothing_keeps_running() {
    let mut h = Harness::new(vec![vq(0, 256, 0), vq(1, 100, 0)], vec![]);
    for s in [
        vf::STATUS_ACKNOWLEDGE,
        vf::STATUS_ACKNOWLEDGE | vf::STATUS_DRIVER | vf::STATUS_FEATURES_OK,
    ] {
        assert_eq!(h.status(s).0, u::VDUSE_REQ_RESULT_OK);
    }
    let (result, log) = h.status(DRIVER_OK_STATUS);
    assert_eq!(result, u::VDUSE_REQ_RESULT_FAILED);
    assert_eq!(starts(&log).len(), 1);
    assert_eq!(log.last(), Some(&Ev::Stopped(0)), "{log:#?}");
    h.stop();
}

#[test]
fn reset_stops_every_worker_before_the_reply_and_forgets_positions() {
    let mut h = Harness::running(vec![vq(0, 256, 3), vq(1, 256, 3)]);
    // Quiesce queue 0 so that a position is saved, then reset.
    h.send(u::VDUSE_GET_VQ_STATE, &[0]);
    let n = h.len();
    let (result, log) = h.status(0);
    assert_eq!(result, u::VDUSE_REQ_RESULT_OK);
    assert_eq!(
        log[n..],
        [Ev::StopRequested(1), Ev::Stopped(1), Ev::Reset],
        "queue 1 is stopped, then the attach's set-up undone, before the reply"
    );
    // After the reset, DRIVER_OK starts again from the driver's positions, not the saved
    // ones, with new kick eventfds installed.
    let n = h.len();
    h.bring_up();
    let later = h.since(n);
    let s = starts(&later);
    assert_eq!(
        s.iter()
            .map(|s| (s.index, s.next_avail))
            .collect::<Vec<_>>(),
        [(0, 3), (1, 3)]
    );
    let kicks = later
        .iter()
        .filter(|e| matches!(e, Ev::KickFd { eventfd: true, .. }))
        .count();
    assert_eq!(kicks, 2);
    h.stop();
}

#[test]
fn failed_status_stops_workers() {
    let mut h = Harness::running(vec![vq(0, 256, 0)]);
    let (result, log) = h.status(DRIVER_OK_STATUS | vf::STATUS_FAILED);
    assert_eq!(result, u::VDUSE_REQ_RESULT_OK);
    assert!(log.contains(&Ev::Stopped(0)));
    h.stop();
}

#[test]
fn update_iotlb_restarts_workers_where_they_stopped() {
    let mut h = Harness::new(vec![vq(0, 256, 3)], vec![]);
    // Before DRIVER_OK there is nothing to restart.
    let (r, log) = h.send(u::VDUSE_UPDATE_IOTLB, &[0, 0, u32::MAX, u32::MAX]);
    assert_eq!(r.result, u::VDUSE_REQ_RESULT_OK);
    assert!(log.is_empty(), "{log:#?}");
    h.bring_up();
    let n = h.len();
    let (r, log) = h.send(u::VDUSE_UPDATE_IOTLB, &[0, 0, u32::MAX, u32::MAX]);
    assert_eq!(r.result, u::VDUSE_REQ_RESULT_OK);
    let log = &log[n..];
    assert_eq!(log[..2], [Ev::StopRequested(0), Ev::Stopped(0)], "{log:#?}");
    assert!(matches!(
        log[2],
        Ev::KickFd {
            q: 0,
            eventfd: true,
            ..
        }
    ));
    // A new worker (so no cached mapping survives) resumes where the old one stopped.
    let s = starts(log);
    assert_eq!(s.len(), 1);
    assert_eq!(
        (s[0].next_avail, s[0].next_used),
        (3 + ADVANCE, 3 + ADVANCE)
    );
    h.stop();
}

#[test]
fn get_vq_state_quiesces_the_queue_and_reports_its_position() {
    let mut h = Harness::running(vec![vq(0, 256, 3), vq(1, 256, 11)]);
    let n = h.len();
    let (r, log) = h.send(u::VDUSE_GET_VQ_STATE, &[0]);
    let want = u::VduseDevResponse::new(r.request_id, u::VDUSE_REQ_RESULT_OK)
        .with_split_vq_state(0, 3 + ADVANCE);
    assert_eq!(r, want);
    assert_eq!(log[n..], [Ev::Stopped(0)], "only queue 0 is stopped");
    // Asked again: the saved position, nothing left to stop.
    let n = h.len();
    let (r2, log) = h.send(u::VDUSE_GET_VQ_STATE, &[0]);
    assert_eq!(r2.payload, want.payload);
    assert!(log[n..].is_empty());
    // Out of range: refused.
    let (r3, _) = h.send(u::VDUSE_GET_VQ_STATE, &[2]);
    assert_eq!(r3.result, u::VDUSE_REQ_RESULT_FAILED);
    h.stop();

    // A queue that never ran reports what the driver set.
    let mut h = Harness::new(vec![vq(0, 256, 3), vq(1, 256, 11)], vec![]);
    let (r, _) = h.send(u::VDUSE_GET_VQ_STATE, &[1]);
    assert_eq!(
        r,
        u::VduseDevResponse::new(r.request_id, u::VDUSE_REQ_RESULT_OK).with_split_vq_state(1, 11)
    );
    h.stop();
}

#[test]
fn group_asid_only_accepts_group_0_in_address_space_0() {
    let mut h = Harness::new(vec![vq(0, 256, 0)], vec![]);
    assert_eq!(
        h.send(u::VDUSE_SET_VQ_GROUP_ASID, &[0, 0]).0.result,
        u::VDUSE_REQ_RESULT_OK
    );
    assert_eq!(
        h.send(u::VDUSE_SET_VQ_GROUP_ASID, &[0, 1]).0.result,
        u::VDUSE_REQ_RESULT_FAILED
    );
    h.stop();
}

#[test]
fn unknown_request_is_refused_and_the_loop_goes_on() {
    let mut h = Harness::new(vec![vq(0, 256, 0)], vec![]);
    let (r, _) = h.send(99, &[]);
    assert_eq!(r.result, u::VDUSE_REQ_RESULT_FAILED);
    assert_eq!(r.reserved, [0; 4]);
    assert_eq!(h.status(vf::STATUS_ACKNOWLEDGE).0, u::VDUSE_REQ_RESULT_OK);
    assert!(h.events.try_recv().is_none());
    h.stop();
}

#[test]
fn a_read_error_ends_the_loop_and_stops_the_workers() {
    let h = Harness::running(vec![vq(0, 256, 0)]);
    h.dev.push(Scripted::ReadError);
    match h.next_event() {
        LoopEvent::Failed(s) => assert!(s.contains("Input/output error"), "{s}"),
        other => panic!("{other:?}"),
    }
    h.shared
        .wait_for("the worker to stop", |l| l.contains(&Ev::Stopped(0)));
    assert_eq!(h.stop().reads, 1);
}

#[test]
fn a_hung_up_device_ends_the_loop_as_broken() {
    let h = Harness::running(vec![vq(0, 256, 0)]);
    h.dev.hang_up();
    match h.next_event() {
        LoopEvent::Failed(s) => assert!(s.contains("broken"), "{s}"),
        other => panic!("{other:?}"),
    }
    h.shared
        .wait_for("the worker to stop", |l| l.contains(&Ev::Stopped(0)));
    h.stop();
}

#[test]
fn a_worker_that_dies_is_reaped_at_once_and_the_device_refuses_driver_ok() {
    let mut h = Harness::running(vec![vq(0, 256, 0), vq(1, 256, 0)]);
    // Queue 1's worker finds its ring corrupt and ends: its exit token goes away.
    h.shared.broken.lock().unwrap().insert(1);
    let token = h.shared.tokens.lock().unwrap().remove(&1).unwrap();
    drop(token);
    match h.next_event() {
        LoopEvent::Broken(s) => assert!(s.contains("queue 1"), "{s}"),
        other => panic!("{other:?}"),
    }
    // Queue 0 goes on until a reset; after it, DRIVER_OK is refused.
    assert!(!h.shared.log().contains(&Ev::Stopped(0)));
    assert_eq!(h.status(0).0, u::VDUSE_REQ_RESULT_OK);
    for s in [
        vf::STATUS_ACKNOWLEDGE,
        vf::STATUS_ACKNOWLEDGE | vf::STATUS_DRIVER | vf::STATUS_FEATURES_OK,
    ] {
        assert_eq!(h.status(s).0, u::VDUSE_REQ_RESULT_OK);
    }
    assert_eq!(h.status(DRIVER_OK_STATUS).0, u::VDUSE_REQ_RESULT_FAILED);
    h.stop();
}

#[test]
fn stop_wakes_an_idle_loop_at_once() {
    let mut h = Harness::running(vec![vq(0, 256, 0)]);
    let handle = h.handle.take().unwrap();
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || tx.send(handle.stop()).unwrap());
    let stats = rx.recv_timeout(DEADLINE).expect("the loop stopped");
    assert_eq!(stats.reads, 1);
    assert!(h.shared.log().contains(&Ev::Stopped(0)));
}

#[test]
fn a_worker_error_is_reported_with_its_causes_once() {
    let e = WorkerError::Setup {
        queue: 2,
        source: std::io::Error::from_raw_os_error(libc::EPERM),
    };
    let msg = super::with_causes(&e);
    assert!(msg.starts_with("queue 2: setup failed: "), "{msg}");
    let errno = std::io::Error::from_raw_os_error(libc::EPERM).to_string();
    assert_eq!(msg.matches(&errno).count(), 1, "{msg}");
}

/// `SET_VQ_READY {num, ready}`.
fn vq_ready(h: &mut Harness, q: u32, ready: bool) -> (u32, Vec<Ev>) {
    let n = h.len();
    let (r, log) = h.send(u::VDUSE_SET_VQ_READY, &[q, u32::from(ready)]);
    (r.result, log[n..].to_vec())
}

#[test]
fn set_vq_ready_stops_and_restarts_one_queue_and_leaves_the_other_running() {
    let mut h = Harness::running(vec![vq(0, 256, 3), vq(1, 256, 11)]);
    let (result, log) = vq_ready(&mut h, 1, false);
    assert_eq!(result, u::VDUSE_REQ_RESULT_OK);
    assert_eq!(
        log,
        [Ev::Stopped(1)],
        "only queue 1 stops, before the reply"
    );
    // Disabled twice: nothing more to do.
    assert_eq!(vq_ready(&mut h, 1, false), (u::VDUSE_REQ_RESULT_OK, vec![]));
    // Its position is what a VMM reads while it is disabled.
    let (r, _) = h.send(u::VDUSE_GET_VQ_STATE, &[1]);
    assert_eq!(r.payload[1] & 0xffff, u32::from(11 + ADVANCE));
    let (result, log) = vq_ready(&mut h, 1, true);
    assert_eq!(result, u::VDUSE_REQ_RESULT_OK);
    assert!(
        matches!(
            log[0],
            Ev::KickFd {
                q: 1,
                eventfd: true,
                ..
            }
        ),
        "a fresh kick eventfd first: {log:#?}"
    );
    let s = starts(&log);
    assert_eq!(s.len(), 1, "{log:#?}");
    assert_eq!(
        (s[0].index, s[0].next_avail, s[0].next_used),
        (1, 11 + ADVANCE, 11 + ADVANCE),
        "resumes where it stopped"
    );
    // Enabled while running: nothing happens.
    assert_eq!(vq_ready(&mut h, 0, true), (u::VDUSE_REQ_RESULT_OK, vec![]));
    assert!(
        !h.shared.log().contains(&Ev::Stopped(0)),
        "queue 0 never stopped"
    );
    h.stop();
}

#[test]
fn set_vq_ready_before_driver_ok_starts_nothing_and_an_unknown_queue_is_refused() {
    let mut h = Harness::new(vec![vq(0, 256, 0)], vec![]);
    assert_eq!(vq_ready(&mut h, 0, true), (u::VDUSE_REQ_RESULT_OK, vec![]));
    assert_eq!(vq_ready(&mut h, 0, false), (u::VDUSE_REQ_RESULT_OK, vec![]));
    assert_eq!(vq_ready(&mut h, 1, true).0, u::VDUSE_REQ_RESULT_FAILED);
    assert_eq!(
        vq_ready(&mut h, u32::MAX, true).0,
        u::VDUSE_REQ_RESULT_FAILED
    );
    h.bring_up();
    assert_eq!(
        starts(&h.shared.log()).len(),
        1,
        "DRIVER_OK looks at ready itself"
    );
    h.stop();
}

#[test]
fn update_iotlb_restarts_only_the_queues_that_were_running() {
    let mut h = Harness::running(vec![vq(0, 256, 0), vq(1, 256, 0)]);
    vq_ready(&mut h, 1, false);
    let n = h.len();
    let (r, log) = h.send(u::VDUSE_UPDATE_IOTLB, &[0, 0, u32::MAX, u32::MAX]);
    assert_eq!(r.result, u::VDUSE_REQ_RESULT_OK);
    let s = starts(&log[n..]);
    assert_eq!(
        s.iter().map(|s| s.index).collect::<Vec<_>>(),
        [0],
        "{log:#?}"
    );
    h.stop();
}

#[test]
fn suspend_completes_every_queue_before_the_reply_and_nothing_runs_until_reset() {
    let mut h = Harness::running(vec![vq(0, 256, 3), vq(1, 256, 5)]);
    let n = h.len();
    let (r, log) = h.send(u::VDUSE_SUSPEND, &[]);
    assert_eq!(r.result, u::VDUSE_REQ_RESULT_OK);
    let log = &log[n..];
    for q in [0, 1] {
        assert!(
            log.contains(&Ev::Stopped(q)),
            "queue {q} stopped before the reply: {log:#?}"
        );
    }
    // Suspended: neither an enable nor an IOTLB update starts a worker, and the positions
    // the workers reached are what GET_VQ_STATE reports.
    let n = h.len();
    assert_eq!(vq_ready(&mut h, 0, true).0, u::VDUSE_REQ_RESULT_OK);
    let (r, _) = h.send(u::VDUSE_UPDATE_IOTLB, &[0, 0, u32::MAX, u32::MAX]);
    assert_eq!(r.result, u::VDUSE_REQ_RESULT_OK);
    for (q, at) in [(0u32, 3u16), (1, 5)] {
        let (r, _) = h.send(u::VDUSE_GET_VQ_STATE, &[q]);
        assert_eq!(r.payload[1] & 0xffff, u32::from(at + ADVANCE), "queue {q}");
    }
    assert!(starts(&h.since(n)).is_empty(), "{:#?}", h.since(n));
    // Only a reset resumes: the next DRIVER_OK starts both queues again.
    assert_eq!(h.status(0).0, u::VDUSE_REQ_RESULT_OK);
    let n = h.len();
    h.bring_up();
    assert_eq!(starts(&h.since(n)).len(), 2);
    h.stop();
}

#[test]
fn suspend_with_a_corrupt_ring_is_refused() {
    let mut h = Harness::running(vec![vq(0, 256, 0)]);
    h.shared.broken.lock().unwrap().insert(0);
    let (r, _) = h.send(u::VDUSE_SUSPEND, &[]);
    assert_eq!(r.result, u::VDUSE_REQ_RESULT_FAILED);
    assert!(matches!(h.next_event(), LoopEvent::Broken(_)));
    h.stop();
}
