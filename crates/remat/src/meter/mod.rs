//! The memory meter: how many bytes a computation keeps live, phase by phase.
//!
//! Three layers, each usable on its own:
//!
//! * **Meters** ([`MemoryMeter`]) read a live-bytes counter and its
//!   high-water mark. [`CpuMeter`] reads the host heap through
//!   [`CountingAllocator`], a counting global allocator installed with
//!   [`install_counting_allocator!`](crate::install_counting_allocator);
//!   `CudaMeter` (feature `cuda`) reads a CUDA device's memory pool (used and
//!   high-water bytes); [`meter_for`] picks the one of a candle `Device`.
//!   [`ManualMeter`] is driven by hand, for tests.
//! * **The recorder** ([`Recorder`]) cuts a run into named phases and takes, for
//!   each, the live bytes at its start and end and its own peak. Code that
//!   does not know whether anyone is recording marks phases through a
//!   [`PhaseSink`]; [`NoPhases`] is the sink that records nothing.
//! * **The report** ([`MemoryReport`]) is the resulting timeline, every count
//!   *above the baseline* (the bytes live when recording started), written
//!   atomically as JSON and summarised in one line.
//!
//! ```
//! use remat::meter::{CpuMeter, Recorder};
//!
//! remat::install_counting_allocator!();
//!
//! fn main() {
//!     let weights = vec![0_u8; 1 << 20]; // live before: part of the baseline
//!     let mut recorder = Recorder::start(CpuMeter);
//!     recorder.phase("forward");
//!     let activations = vec![1_u8; 3 << 20];
//!     recorder.phase("backward");
//!     drop(activations);
//!     let report = recorder.finish();
//!     assert!(report.peak_bytes >= 3 << 20);
//!     println!("{}", report.summary());
//!     # drop(weights);
//! }
//! ```
//!
//! # Phases
//!
//! A mark ([`Recorder::phase`]) ends the open phase and opens the next, so the
//! phases partition the recording. At each mark the recorder reads the live
//! bytes and the peak of the closing phase, then resets the meter's peak
//! ([`MemoryMeter::reset_peak`]) so that the next phase's peak is its own.
//! [`Recorder::start`] opens a leading phase named [`LEADING_PHASE_NAME`]; it
//! stays in the timeline only if something was allocated in it, so a mark right
//! after `start` gives a timeline that begins with the marked phase.
//!
//! Names need not be unique: repeat `"recompute"` as often as it runs and add
//! the repeats up with [`MemoryReport::totals_by_name`]. Nest by writing paths,
//! `"backward/recompute/3"`, by hand or through [`PhaseSinkExt::prefixed`],
//! and add up a level with [`MemoryReport::totals_by_prefix`].
//!
//! # The recorder's own allocations
//!
//! With a host-heap meter the recorder's bookkeeping would be measured too. It
//! keeps that small and takes it out:
//!
//! * the timeline is reserved up front ([`DEFAULT_PHASE_CAPACITY`] phases,
//!   or [`Recorder::with_capacity`]) *after* the baseline is read, so a mark
//!   normally allocates nothing;
//! * phase names are `Cow<'static, str>`: a literal costs nothing, a
//!   `format!`ed name is kept as the caller's `String`;
//! * the bytes the recorder keeps live (the reservation, any doubling of it
//!   when more phases come than reserved, the names it holds) are added to a
//!   bookkeeping count, reported as `bookkeeping_bytes` and subtracted from
//!   every later reading, so they never show as a phase's memory. A timeline
//!   doubling happens between the readings of two phases, outside both.
//!
//! What remains is below the noise: a name `format!`ed by the caller exists
//! just before the mark, so it is taken out of the closing phase's end and peak
//! bytes too, which can under-state that peak by at most the name's length.
//! With a device meter ([`MemoryMeter::counts_host_heap`] false) nothing is
//! subtracted.
//!
//! The host-heap counters are process-wide: allocations by other threads count.

#![warn(missing_docs)]

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod report;

use std::borrow::Cow;
use std::mem;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub use cpu::{is_installed, live_bytes, peak_bytes, reset_peak, CountingAllocator, CpuMeter};
pub use report::{format_bytes, MemoryReport, Phase, PhaseTotals, ReportError};

#[cfg(feature = "cuda")]
pub use cuda::CudaMeter;

/// The meter of `device`'s memory: [`CpuMeter`] (the host heap) for the CPU, and with
/// the `cuda` feature `CudaMeter` (the device's memory pool) for a CUDA device.
///
/// # Errors
/// A CUDA driver call failed, or the device has no meter in this build (CUDA without
/// the `cuda` feature, Metal).
pub fn meter_for(device: &candle_core::Device) -> candle_core::Result<Box<dyn MemoryMeter>> {
    match device {
        candle_core::Device::Cpu => Ok(Box::new(CpuMeter)),
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(cuda) => Ok(Box::new(
            CudaMeter::new(cuda).map_err(candle_core::Error::wrap)?,
        )),
        other => Err(candle_core::Error::Msg(format!(
            "no memory meter for {:?} in this build",
            other.location()
        ))),
    }
}

/// Installs [`CountingAllocator`](crate::meter::CountingAllocator) as the
/// global allocator of the binary (or test binary) it is invoked in.
///
/// Invoke it once, at module level of the crate root of a `main.rs` or of an
/// integration test file. The optional argument names the static (default
/// `REMAT_COUNTING_ALLOCATOR`).
///
/// ```ignore
/// remat::install_counting_allocator!();
/// ```
#[macro_export]
macro_rules! install_counting_allocator {
    () => {
        $crate::install_counting_allocator!(REMAT_COUNTING_ALLOCATOR);
    };
    ($static_name:ident) => {
        #[global_allocator]
        static $static_name: $crate::meter::CountingAllocator =
            $crate::meter::CountingAllocator::new();
    };
}

/// A source of live-bytes readings with a resettable high-water mark.
///
/// Readings are in bytes and absolute (not above any baseline). Meters are
/// read through `&self`: counters are atomics or driver queries. A meter that
/// can fail to read (a driver call) should report its last good value and log,
/// rather than disturb the computation it measures.
pub trait MemoryMeter {
    /// Short name for reports, e.g. `"cpu-heap"` or `"cuda:0"`.
    fn name(&self) -> &str;

    /// Bytes live now.
    fn live_bytes(&self) -> u64;

    /// Highest [`live_bytes`](MemoryMeter::live_bytes) since the last
    /// [`reset_peak`](MemoryMeter::reset_peak) (or since the meter began).
    fn peak_bytes(&self) -> u64;

    /// Starts a new high-water window: the peak becomes the bytes live now.
    fn reset_peak(&self);

    /// Capacity of the measured memory, when known (a device's total memory).
    fn device_total_bytes(&self) -> Option<u64> {
        None
    }

    /// Memory a new workload could still take now, when the meter can tell: the
    /// system's available RAM for [`CpuMeter`], the device's free memory for a GPU.
    /// This is what `--budget auto` sizes itself from.
    fn available_bytes(&self) -> Option<u64> {
        None
    }

    /// Whether the readings mean anything: false for [`CpuMeter`] when
    /// [`CountingAllocator`] is not installed, which reads 0 throughout.
    fn is_measuring(&self) -> bool {
        true
    }

    /// Whether this meter sees the recorder's own heap allocations, which the
    /// [`Recorder`] must then subtract. True for [`CpuMeter`] only.
    fn counts_host_heap(&self) -> bool {
        false
    }
}

/// Forwards [`MemoryMeter`] through a pointer type.
macro_rules! forward_memory_meter {
    ($($pointer:ty),+) => {$(
        impl<M: MemoryMeter + ?Sized> MemoryMeter for $pointer {
            fn name(&self) -> &str {
                (**self).name()
            }
            fn live_bytes(&self) -> u64 {
                (**self).live_bytes()
            }
            fn peak_bytes(&self) -> u64 {
                (**self).peak_bytes()
            }
            fn reset_peak(&self) {
                (**self).reset_peak()
            }
            fn device_total_bytes(&self) -> Option<u64> {
                (**self).device_total_bytes()
            }
            fn available_bytes(&self) -> Option<u64> {
                (**self).available_bytes()
            }
            fn is_measuring(&self) -> bool {
                (**self).is_measuring()
            }
            fn counts_host_heap(&self) -> bool {
                (**self).counts_host_heap()
            }
        }
    )+};
}

forward_memory_meter!(&M, Box<M>, Arc<M>);

/// A meter whose counters are set by hand: for tests of code that records
/// phases, and for sources polled by other means.
#[derive(Debug)]
pub struct ManualMeter {
    name: &'static str,
    live_bytes: AtomicU64,
    peak_bytes: AtomicU64,
    device_total_bytes: Option<u64>,
    available_bytes: Option<u64>,
}

impl ManualMeter {
    /// A meter named `name` with nothing live.
    #[must_use]
    pub const fn new(name: &'static str) -> Self {
        Self {
            name,
            live_bytes: AtomicU64::new(0),
            peak_bytes: AtomicU64::new(0),
            device_total_bytes: None,
            available_bytes: None,
        }
    }

    /// The same meter, reporting `bytes` as the device's capacity.
    #[must_use]
    pub const fn with_device_total_bytes(mut self, bytes: u64) -> Self {
        self.device_total_bytes = Some(bytes);
        self
    }

    /// The same meter, reporting `bytes` as available to new work.
    #[must_use]
    pub const fn with_available_bytes(mut self, bytes: u64) -> Self {
        self.available_bytes = Some(bytes);
        self
    }

    /// Counts `bytes` more as live, raising the peak if needed.
    pub fn allocate(&self, bytes: u64) {
        let live_now = self
            .live_bytes
            .fetch_add(bytes, Ordering::Relaxed)
            .saturating_add(bytes);
        self.peak_bytes.fetch_max(live_now, Ordering::Relaxed);
    }

    /// Counts `bytes` fewer as live (not below 0).
    pub fn free(&self, bytes: u64) {
        // `fetch_update` only fails when the closure returns `None`; it never does.
        let _ = self
            .live_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |live| {
                Some(live.saturating_sub(bytes))
            });
    }
}

impl MemoryMeter for ManualMeter {
    fn name(&self) -> &str {
        self.name
    }

    fn live_bytes(&self) -> u64 {
        self.live_bytes.load(Ordering::Relaxed)
    }

    fn peak_bytes(&self) -> u64 {
        self.peak_bytes.load(Ordering::Relaxed)
    }

    fn reset_peak(&self) {
        self.peak_bytes
            .store(self.live_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
        self.peak_bytes
            .fetch_max(self.live_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    fn device_total_bytes(&self) -> Option<u64> {
        self.device_total_bytes
    }

    fn available_bytes(&self) -> Option<u64> {
        self.available_bytes
    }
}

/// A phase name: a `&'static str` literal costs no allocation, a `String`
/// (from `format!`) is kept as it is.
pub type PhaseName = Cow<'static, str>;

/// Phases reserved in the timeline up front by [`Recorder::start`].
pub const DEFAULT_PHASE_CAPACITY: usize = 256;

/// Name of the phase that [`Recorder::start`] opens before the first mark.
pub const LEADING_PHASE_NAME: &str = "(start)";

/// Records a timeline of phases against a [`MemoryMeter`].
///
/// See the [module documentation](self) for what is measured at each mark and
/// how the recorder keeps its own allocations out of the readings.
#[derive(Debug)]
#[must_use = "a recorder reports nothing until `finish` turns it into a MemoryReport"]
pub struct Recorder<M: MemoryMeter = CpuMeter> {
    meter: M,
    /// Whether `meter` sees this recorder's heap allocations (cached).
    sees_own_heap: bool,
    started_at: Instant,
    baseline_bytes: u64,
    /// Heap bytes this recorder keeps live; subtracted from every reading.
    bookkeeping_bytes: u64,
    open: OpenPhase,
    timeline: Vec<ClosedPhase>,
}

/// The phase in progress.
#[derive(Debug)]
struct OpenPhase {
    name: PhaseName,
    start_s: f64,
    start_bytes: u64,
    is_leading: bool,
}

impl OpenPhase {
    /// A stand-in while the real open phase is being closed; allocates nothing.
    const fn placeholder() -> Self {
        Self {
            name: Cow::Borrowed(""),
            start_s: 0.0,
            start_bytes: 0,
            is_leading: false,
        }
    }
}

/// A finished phase, still holding its name as given.
#[derive(Debug)]
struct ClosedPhase {
    name: PhaseName,
    start_s: f64,
    end_s: f64,
    start_bytes: u64,
    end_bytes: u64,
    peak_bytes: u64,
}

impl ClosedPhase {
    fn into_phase(self) -> Phase {
        Phase {
            name: self.name.into_owned(),
            start_s: self.start_s,
            end_s: self.end_s,
            start_bytes: self.start_bytes,
            end_bytes: self.end_bytes,
            peak_bytes: self.peak_bytes,
        }
    }
}

/// Readings taken at a mark, before the recorder touches any memory.
#[derive(Debug, Clone, Copy)]
struct MarkReading {
    at_s: f64,
    live_bytes: u64,
    peak_bytes: u64,
}

impl<M: MemoryMeter> Recorder<M> {
    /// Starts recording: reads the baseline (the bytes live now), reserves
    /// room for [`DEFAULT_PHASE_CAPACITY`] phases and opens the leading phase.
    pub fn start(meter: M) -> Self {
        Self::with_capacity(meter, DEFAULT_PHASE_CAPACITY)
    }

    /// [`Recorder::start`], reserving room for `phase_capacity` phases; more
    /// still fit, the timeline doubles (outside any phase's readings).
    pub fn with_capacity(meter: M, phase_capacity: usize) -> Self {
        let baseline_bytes = meter.live_bytes();
        let started_at = Instant::now();
        let timeline = Vec::with_capacity(phase_capacity);
        let mut recorder = Self {
            sees_own_heap: meter.counts_host_heap(),
            meter,
            started_at,
            baseline_bytes,
            bookkeeping_bytes: 0,
            open: OpenPhase::placeholder(),
            timeline,
        };
        recorder.charge_bookkeeping(timeline_bytes(recorder.timeline.capacity()));
        recorder.open_phase(Cow::Borrowed(LEADING_PHASE_NAME), true);
        recorder
    }

    /// Ends the open phase and opens one named `name`.
    ///
    /// Takes a literal (`"forward"`) or a `String` (`format!("recompute {i}")`);
    /// allocates nothing itself unless the reserved timeline is full.
    pub fn phase(&mut self, name: impl Into<PhaseName>) {
        let name = name.into();
        let reading = self.read_mark();
        self.close_open_phase(reading, self.own_heap_bytes_of(&name));
        self.open_phase(name, false);
    }

    /// Ends the open phase and returns the report.
    #[must_use = "the report is all that a recording produces"]
    pub fn finish(mut self) -> MemoryReport {
        let reading = self.read_mark();
        self.close_open_phase(reading, 0);
        let timeline: Vec<Phase> = mem::take(&mut self.timeline)
            .into_iter()
            .map(ClosedPhase::into_phase)
            .collect();
        MemoryReport {
            meter: self.meter.name().to_owned(),
            baseline_bytes: self.baseline_bytes,
            peak_bytes: timeline
                .iter()
                .map(|phase| phase.peak_bytes)
                .max()
                .unwrap_or(0),
            device_total_bytes: self.meter.device_total_bytes(),
            duration_s: reading.at_s,
            bookkeeping_bytes: self.bookkeeping_bytes,
            timeline,
        }
    }

    /// The meter being read.
    pub fn meter(&self) -> &M {
        &self.meter
    }

    /// Bytes that were live when recording started.
    pub fn baseline_bytes(&self) -> u64 {
        self.baseline_bytes
    }

    /// Bytes live now above the baseline, the recorder's own excluded.
    pub fn live_above_baseline_bytes(&self) -> u64 {
        self.above_baseline(self.meter.live_bytes())
    }

    fn read_mark(&self) -> MarkReading {
        let at_s = self.started_at.elapsed().as_secs_f64();
        // Live first: the peak read after it is at least as high.
        let live_bytes = self.meter.live_bytes();
        let peak_bytes = self.meter.peak_bytes();
        MarkReading {
            at_s,
            live_bytes,
            peak_bytes,
        }
    }

    /// Moves the open phase into the timeline, unless it is an empty leading
    /// phase. `incoming_name_bytes` were allocated by the caller just before
    /// the mark and are not the phase's.
    fn close_open_phase(&mut self, reading: MarkReading, incoming_name_bytes: u64) {
        let open = mem::replace(&mut self.open, OpenPhase::placeholder());
        let end_bytes = self
            .above_baseline(reading.live_bytes)
            .saturating_sub(incoming_name_bytes);
        let peak_bytes = self
            .above_baseline(reading.peak_bytes)
            .saturating_sub(incoming_name_bytes)
            .max(open.start_bytes)
            .max(end_bytes);
        if open.is_leading && peak_bytes == 0 {
            return;
        }
        self.make_room_for_one_phase();
        self.timeline.push(ClosedPhase {
            name: open.name,
            start_s: open.start_s,
            end_s: reading.at_s,
            start_bytes: open.start_bytes,
            end_bytes,
            peak_bytes,
        });
    }

    fn open_phase(&mut self, name: PhaseName, is_leading: bool) {
        self.charge_bookkeeping(self.own_heap_bytes_of(&name));
        let start_bytes = self.above_baseline(self.meter.live_bytes());
        self.meter.reset_peak();
        self.open = OpenPhase {
            name,
            start_s: self.started_at.elapsed().as_secs_f64(),
            start_bytes,
            is_leading,
        };
    }

    /// Doubles the timeline when full, charging the growth to bookkeeping.
    fn make_room_for_one_phase(&mut self) {
        let capacity_before = self.timeline.capacity();
        if self.timeline.len() < capacity_before {
            return;
        }
        self.timeline.reserve(capacity_before.max(1));
        let grown_by = self.timeline.capacity() - capacity_before;
        self.charge_bookkeeping(timeline_bytes(grown_by));
    }

    /// Heap bytes of `name` as the meter sees them: a `String`'s buffer.
    fn own_heap_bytes_of(&self, name: &PhaseName) -> u64 {
        match name {
            Cow::Owned(owned) if self.sees_own_heap => to_u64(owned.capacity()),
            _ => 0,
        }
    }

    fn charge_bookkeeping(&mut self, heap_bytes: u64) {
        if self.sees_own_heap {
            self.bookkeeping_bytes = self.bookkeeping_bytes.saturating_add(heap_bytes);
        }
    }

    fn above_baseline(&self, live_bytes: u64) -> u64 {
        live_bytes.saturating_sub(self.baseline_bytes.saturating_add(self.bookkeeping_bytes))
    }
}

/// Heap bytes of `phases` timeline slots.
fn timeline_bytes(phases: usize) -> u64 {
    to_u64(phases.saturating_mul(mem::size_of::<ClosedPhase>()))
}

fn to_u64(bytes: usize) -> u64 {
    u64::try_from(bytes).unwrap_or(u64::MAX)
}

/// Where code marks phases without knowing whether anyone records them.
///
/// Library code takes `&mut dyn PhaseSink` (or `impl PhaseSink`) and marks
/// with [`PhaseSinkExt::phase`]; callers pass a `&mut Recorder`, an
/// `Option<&mut Recorder>`, or [`NoPhases`]. A mark on a sink that does not
/// record costs a virtual call; build costly names with
/// [`PhaseSinkExt::phase_with`], which skips them then.
pub trait PhaseSink {
    /// Ends the current phase and opens one named `name`.
    fn enter_phase(&mut self, name: PhaseName);

    /// Whether marks are recorded (so whether building a name is worth it).
    fn is_recording(&self) -> bool;
}

impl<M: MemoryMeter> PhaseSink for Recorder<M> {
    fn enter_phase(&mut self, name: PhaseName) {
        self.phase(name);
    }

    fn is_recording(&self) -> bool {
        true
    }
}

impl<S: PhaseSink + ?Sized> PhaseSink for &mut S {
    fn enter_phase(&mut self, name: PhaseName) {
        (**self).enter_phase(name);
    }

    fn is_recording(&self) -> bool {
        (**self).is_recording()
    }
}

impl<S: PhaseSink> PhaseSink for Option<S> {
    fn enter_phase(&mut self, name: PhaseName) {
        if let Some(sink) = self {
            sink.enter_phase(name);
        }
    }

    fn is_recording(&self) -> bool {
        self.as_ref().is_some_and(PhaseSink::is_recording)
    }
}

/// The sink that records nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoPhases;

impl PhaseSink for NoPhases {
    fn enter_phase(&mut self, _name: PhaseName) {}

    fn is_recording(&self) -> bool {
        false
    }
}

/// Convenient marks on any [`PhaseSink`], `dyn` included.
pub trait PhaseSinkExt: PhaseSink {
    /// Marks a phase named by a literal or a `String`.
    fn phase(&mut self, name: impl Into<PhaseName>) {
        self.enter_phase(name.into());
    }

    /// Marks a phase whose name is built only if the sink records:
    /// `sink.phase_with(|| format!("recompute {i}"))`.
    fn phase_with<N: Into<PhaseName>>(&mut self, name: impl FnOnce() -> N) {
        if self.is_recording() {
            self.enter_phase(name().into());
        }
    }

    /// A sink that marks phases here under `prefix/`: hand it to nested code
    /// so that its `"grad"` is recorded as `"backward/grad"`. Creating it marks
    /// nothing.
    fn prefixed(&mut self, prefix: impl Into<PhaseName>) -> Prefixed<'_, Self> {
        Prefixed {
            sink: self,
            prefix: prefix.into(),
        }
    }
}

impl<S: PhaseSink + ?Sized> PhaseSinkExt for S {}

/// A [`PhaseSink`] that prepends `prefix/` to the names it passes on; made by
/// [`PhaseSinkExt::prefixed`].
#[derive(Debug)]
pub struct Prefixed<'a, S: PhaseSink + ?Sized> {
    sink: &'a mut S,
    prefix: PhaseName,
}

impl<S: PhaseSink + ?Sized> PhaseSink for Prefixed<'_, S> {
    fn enter_phase(&mut self, name: PhaseName) {
        if self.sink.is_recording() {
            let joined = join_phase_names(&self.prefix, &name);
            self.sink.enter_phase(Cow::Owned(joined));
        }
    }

    fn is_recording(&self) -> bool {
        self.sink.is_recording()
    }
}

/// `prefix/name` in one exactly sized allocation (`name` alone for an empty prefix).
fn join_phase_names(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        return name.to_owned();
    }
    let mut joined = String::with_capacity(prefix.len() + 1 + name.len());
    joined.push_str(prefix);
    joined.push('/');
    joined.push_str(name);
    joined
}

#[cfg(test)]
mod tests {
    //! Recorder logic against [`ManualMeter`], whose readings are exact.

    use super::*;

    const MIB: u64 = 1 << 20;

    fn phase_names(report: &MemoryReport) -> Vec<&str> {
        report
            .timeline
            .iter()
            .map(|phase| phase.name.as_str())
            .collect()
    }

    #[test]
    fn phases_record_start_end_and_their_own_peak() {
        let meter = ManualMeter::new("fake").with_device_total_bytes(80 * MIB);
        meter.allocate(10 * MIB); // weights: baseline
        let mut recorder = Recorder::start(&meter);
        recorder.phase("one");
        meter.allocate(MIB);
        recorder.phase("three");
        meter.allocate(3 * MIB);
        recorder.phase("transient");
        meter.allocate(5 * MIB);
        meter.free(5 * MIB);
        recorder.phase("free");
        meter.free(4 * MIB);
        let report = recorder.finish();

        assert_eq!(report.meter, "fake");
        assert_eq!(report.baseline_bytes, 10 * MIB);
        assert_eq!(report.device_total_bytes, Some(80 * MIB));
        assert_eq!(
            report.bookkeeping_bytes, 0,
            "a device meter sees no host heap"
        );
        assert_eq!(phase_names(&report), ["one", "three", "transient", "free"]);
        let bytes: Vec<(u64, u64, u64)> = report
            .timeline
            .iter()
            .map(|p| (p.start_bytes, p.end_bytes, p.peak_bytes))
            .collect();
        assert_eq!(
            bytes,
            [
                (0, MIB, MIB),
                (MIB, 4 * MIB, 4 * MIB),
                (4 * MIB, 4 * MIB, 9 * MIB),
                (4 * MIB, 0, 4 * MIB),
            ]
        );
        assert_eq!(report.peak_bytes, 9 * MIB);
    }

    #[test]
    fn times_are_ordered_and_cover_the_recording() {
        let meter = ManualMeter::new("fake");
        let mut recorder = Recorder::start(&meter);
        for step in 0..5 {
            recorder.phase(format!("step {step}"));
        }
        let report = recorder.finish();
        assert_eq!(report.timeline.len(), 5);
        let mut previous_end_s = 0.0;
        for phase in &report.timeline {
            assert!(phase.start_s >= previous_end_s);
            assert!(phase.end_s >= phase.start_s);
            previous_end_s = phase.end_s;
        }
        assert!(report.duration_s >= previous_end_s);
    }

    #[test]
    fn leading_phase_is_kept_only_when_something_happened() {
        let meter = ManualMeter::new("fake");
        let mut quiet = Recorder::start(&meter);
        quiet.phase("forward");
        assert_eq!(phase_names(&quiet.finish()), ["forward"]);

        let mut busy = Recorder::start(&meter);
        meter.allocate(100);
        busy.phase("forward");
        let report = busy.finish();
        assert_eq!(phase_names(&report), [LEADING_PHASE_NAME, "forward"]);
        assert_eq!(report.timeline[0].peak_bytes, 100);
    }

    #[test]
    fn an_unmarked_recording_reports_its_leading_phase_or_nothing() {
        let meter = ManualMeter::new("fake");
        let report = Recorder::start(&meter).finish();
        assert!(report.timeline.is_empty());
        assert_eq!(report.peak_bytes, 0);
    }

    #[test]
    fn peak_is_above_baseline_and_saturates() {
        let meter = ManualMeter::new("fake");
        meter.allocate(5 * MIB);
        let mut recorder = Recorder::start(&meter);
        recorder.phase("frees weights");
        meter.free(2 * MIB);
        let report = recorder.finish();
        let phase = &report.timeline[0];
        assert_eq!((phase.start_bytes, phase.end_bytes), (0, 0));
        assert_eq!(report.peak_bytes, 0);
    }

    #[test]
    fn more_phases_than_reserved_still_fit() {
        let meter = ManualMeter::new("fake");
        let mut recorder = Recorder::with_capacity(&meter, 2);
        for _ in 0..9 {
            recorder.phase("again");
        }
        let report = recorder.finish();
        assert_eq!(report.timeline.len(), 9);
        assert_eq!(report.totals_by_name()[0].count, 9);
    }

    /// A host-heap meter driven by hand: the recorder must subtract what it
    /// charges to bookkeeping, here never actually allocated.
    struct FakeHostHeap(ManualMeter);

    impl MemoryMeter for FakeHostHeap {
        fn name(&self) -> &str {
            self.0.name()
        }
        fn live_bytes(&self) -> u64 {
            self.0.live_bytes()
        }
        fn peak_bytes(&self) -> u64 {
            self.0.peak_bytes()
        }
        fn reset_peak(&self) {
            self.0.reset_peak()
        }
        fn counts_host_heap(&self) -> bool {
            true
        }
    }

    #[test]
    fn host_heap_bookkeeping_is_charged_and_subtracted() {
        let meter = FakeHostHeap(ManualMeter::new("fake-heap"));
        let reserved = timeline_bytes(4);
        let mut recorder = Recorder::with_capacity(&meter, 4);
        meter.0.allocate(reserved); // what the reservation really costs
        let name = String::from("named");
        let name_bytes = to_u64(name.capacity());
        meter.0.allocate(name_bytes); // the caller's format!
        recorder.phase(name);
        meter.0.allocate(MIB);
        let report = recorder.finish();

        assert_eq!(report.bookkeeping_bytes, reserved + name_bytes);
        assert_eq!(
            phase_names(&report),
            ["named"],
            "bookkeeping is not activity"
        );
        let phase = &report.timeline[0];
        assert_eq!((phase.start_bytes, phase.end_bytes), (0, MIB));
        assert_eq!(phase.peak_bytes, MIB);
    }

    #[test]
    fn library_code_marks_through_any_sink() {
        fn train_step(sink: &mut dyn PhaseSink, meter: &ManualMeter) {
            sink.phase("forward");
            meter.allocate(MIB);
            let mut backward = sink.prefixed("backward");
            for layer in (0..2).rev() {
                backward.phase_with(|| format!("recompute/{layer}"));
                backward.phase_with(|| format!("grad/{layer}"));
            }
            meter.free(MIB);
        }

        let meter = ManualMeter::new("fake");
        let mut recorder = Recorder::start(&meter);
        train_step(&mut recorder, &meter);
        let report = recorder.finish();
        assert_eq!(
            phase_names(&report),
            [
                "forward",
                "backward/recompute/1",
                "backward/grad/1",
                "backward/recompute/0",
                "backward/grad/0"
            ]
        );
        assert_eq!(report.totals_by_prefix(1)[1].count, 4);

        train_step(&mut NoPhases, &meter);
        let mut absent: Option<&mut Recorder<&ManualMeter>> = None;
        train_step(&mut absent, &meter);
        assert!(!absent.is_recording());

        let mut present_recorder = Recorder::start(&meter);
        let mut present = Some(&mut present_recorder);
        train_step(&mut present, &meter);
        assert_eq!(present_recorder.finish().timeline.len(), 5);
    }

    #[test]
    fn prefixes_nest() {
        let meter = ManualMeter::new("fake");
        let mut recorder = Recorder::start(&meter);
        {
            let mut outer = recorder.prefixed("train");
            let mut inner = outer.prefixed(String::from("step 3"));
            inner.phase("forward");
        }
        assert_eq!(phase_names(&recorder.finish()), ["train/step 3/forward"]);
    }

    #[test]
    fn no_phases_never_builds_a_name() {
        let mut sink = NoPhases;
        sink.phase_with(|| -> String { panic!("name built for a sink that does not record") });
        sink.prefixed("x")
            .phase_with(|| -> String { panic!("built under a prefix") });
    }

    #[test]
    fn manual_meter_keeps_a_resettable_peak() {
        let meter = ManualMeter::new("fake");
        meter.allocate(10);
        meter.free(4);
        assert_eq!((meter.live_bytes(), meter.peak_bytes()), (6, 10));
        meter.reset_peak();
        assert_eq!(meter.peak_bytes(), 6);
        meter.free(100);
        assert_eq!(meter.live_bytes(), 0);
    }

    #[test]
    fn meters_work_through_pointers() {
        let boxed: Box<dyn MemoryMeter> = Box::new(ManualMeter::new("boxed"));
        let shared = Arc::new(ManualMeter::new("shared"));
        assert_eq!(Recorder::start(boxed).finish().meter, "boxed");
        assert_eq!(
            Recorder::start(Arc::clone(&shared)).finish().meter,
            "shared"
        );
    }

    #[test]
    fn the_cpu_gets_the_heap_meter() {
        let meter = meter_for(&candle_core::Device::Cpu).expect("a CPU meter");
        assert_eq!(meter.name(), CpuMeter::NAME);
        assert!(meter.counts_host_heap());
    }
}
