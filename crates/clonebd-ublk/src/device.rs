//! The ublk device itself, through libublk: one control device, one thread per queue.
//!
//! libublk's control commands go through an io_uring owned by the calling thread, so the
//! device is created and run on a thread of its own, and stopping it from the daemon's
//! thread first gives that thread a control ring.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use clonebd_driver::{BlockExport, Volume};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::{UblkDev, UblkIOCtx, UblkQueue};
use libublk::{BufDesc, BufDescList, UblkFlags, UblkIORes, sys};

use crate::{UblkError, UblkOptions, op, serve};

// The ABI numbers `serve` uses are libublk's.
const _: () = {
    assert!(op::READ == sys::UBLK_IO_OP_READ);
    assert!(op::WRITE == sys::UBLK_IO_OP_WRITE);
    assert!(op::FLUSH == sys::UBLK_IO_OP_FLUSH);
    assert!(op::DISCARD == sys::UBLK_IO_OP_DISCARD);
    assert!(op::WRITE_ZEROES == sys::UBLK_IO_OP_WRITE_ZEROES);
    assert!(op::F_FUA == sys::UBLK_IO_F_FUA);
};

/// How long to wait for the device to come up.
const START_LIMIT: Duration = Duration::from_secs(30);

/// A running device.
pub(crate) struct Device {
    ctrl: Arc<UblkCtrl>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("path", &self.path())
            .finish_non_exhaustive()
    }
}

/// Serves queue `qid` until the device stops.
fn serve_queue(vol: &Volume, qid: u16, dev: &UblkDev) {
    let mut bufs = dev.alloc_queue_io_bufs();
    let queue = match UblkQueue::new(qid, dev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))))
    {
        Ok(q) => q,
        Err(e) => {
            tracing::error!("ublk queue {qid}: {e}");
            return;
        }
    };
    queue.wait_and_handle_io(move |q: &UblkQueue, tag: u16, _io: &UblkIOCtx| {
        let iod = q.get_iod(tag);
        let (op_flags, start, nr) = (iod.op_flags, iod.start_sector, iod.nr_sectors);
        let Some(buf) = bufs.get_mut(usize::from(tag)) else {
            tracing::error!("ublk queue {qid}: tag {tag} has no buffer");
            return;
        };
        let res = serve(vol, op_flags, start, nr, buf.as_mut_slice());
        if let Err(e) = q.complete_io_cmd_unified(
            tag,
            BufDesc::Slice(buf.as_slice()),
            Ok(UblkIORes::Result(res)),
        ) {
            tracing::error!("ublk queue {qid}: completing tag {tag}: {e}");
        }
    });
}

fn ensure_ctrl_ring() -> Result<(), UblkError> {
    libublk::ublk_init_ctrl_task_ring(|ring| {
        if ring.is_none() {
            *ring = Some(
                io_uring::IoUring::<io_uring::squeue::Entry128>::builder()
                    .build(16)
                    .map_err(libublk::UblkError::IOError)?,
            );
        }
        Ok(())
    })
    .map_err(|e| UblkError::Create(e.to_string()))
}

impl Device {
    pub(crate) fn start(vol: Volume, opts: &UblkOptions) -> Result<Device, UblkError> {
        let opts = *opts;
        let (tx, rx) = channel::<Result<Arc<UblkCtrl>, UblkError>>();
        let thread = std::thread::Builder::new()
            .name("clonebd-ublk".to_string())
            .spawn(move || run(vol, opts, &tx))
            .map_err(|e| UblkError::Start(e.to_string()))?;
        match wait_started(&rx) {
            Ok(ctrl) => Ok(Device {
                ctrl,
                thread: Some(thread),
            }),
            Err(e) => {
                let _ = thread.join();
                Err(e)
            }
        }
    }

    pub(crate) fn path(&self) -> PathBuf {
        PathBuf::from(self.ctrl.get_bdev_path())
    }

    pub(crate) fn stop(mut self) {
        if let Err(e) = ensure_ctrl_ring() {
            tracing::error!("{e}");
            return;
        }
        if let Err(e) = self.ctrl.kill_dev() {
            tracing::error!("stopping the ublk device: {e}");
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Err(e) = self.ctrl.del_dev() {
            tracing::error!("deleting the ublk device: {e}");
        }
    }
}

fn wait_started(
    rx: &Receiver<Result<Arc<UblkCtrl>, UblkError>>,
) -> Result<Arc<UblkCtrl>, UblkError> {
    rx.recv_timeout(START_LIMIT)
        .map_err(|_| UblkError::Start("no answer from the device thread".to_string()))?
}

/// The device thread: creates the device, serves it until it is stopped.
fn run(
    vol: Volume,
    opts: UblkOptions,
    tx: &std::sync::mpsc::Sender<Result<Arc<UblkCtrl>, UblkError>>,
) {
    let ctrl = match UblkCtrlBuilder::default()
        .name("clonebd")
        .nr_queues(opts.queues.max(1))
        .depth(opts.depth.max(1))
        .io_buf_bytes(opts.max_io_bytes)
        .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
        .build()
    {
        Ok(c) => Arc::new(c),
        Err(e) => {
            let _ = tx.send(Err(UblkError::Create(e.to_string())));
            return;
        }
    };
    let size = vol.size_bytes();
    let caps = vol.caps();
    let lbs = caps.logical_block_size.max(512);
    let region = caps.granularity;
    let qvol = vol.clone();
    let started = Arc::clone(&ctrl);
    let tx2 = tx.clone();
    let r = ctrl.run_target(
        move |dev: &mut UblkDev| {
            dev.set_default_params(size);
            let p = &mut dev.tgt.params;
            p.basic.attrs = 0;
            if caps.flush {
                p.basic.attrs |= sys::UBLK_ATTR_VOLATILE_CACHE;
            }
            if caps.fua {
                p.basic.attrs |= sys::UBLK_ATTR_FUA;
            }
            p.basic.logical_bs_shift = u8::try_from(lbs.trailing_zeros()).unwrap_or(9);
            p.basic.physical_bs_shift = p.basic.logical_bs_shift.max(12);
            let region_shift = u8::try_from(region.trailing_zeros()).unwrap_or(12);
            p.basic.io_min_shift = region_shift;
            p.basic.io_opt_shift = region_shift;
            if caps.discard || caps.write_zeroes {
                p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
                p.discard.discard_granularity = u32::try_from(region).unwrap_or(u32::MAX);
                let max = (u32::MAX >> 9) / 8 * 8;
                p.discard.max_discard_sectors = if caps.discard { max } else { 0 };
                p.discard.max_write_zeroes_sectors = if caps.write_zeroes { max } else { 0 };
                p.discard.max_discard_segments = 1;
            }
            Ok(())
        },
        move |qid: u16, dev: &UblkDev| serve_queue(&qvol, qid, dev),
        move |_ctrl: &UblkCtrl| {
            let _ = tx2.send(Ok(started));
        },
    );
    if let Err(e) = r {
        let _ = tx.send(Err(UblkError::Start(e.to_string())));
    }
}
