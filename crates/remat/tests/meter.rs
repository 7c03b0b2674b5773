//! The counting allocator, installed for real, and the recorder over it.
//!
//! The counters are process-wide and libtest runs tests on several threads, so
//! every test here holds [`SERIAL`] while it measures: no other test allocates
//! meanwhile. What can still move the counters is libtest's own bookkeeping on
//! its main thread (test names, result messages, a few small blocks per
//! finished test: a few KiB at most). Deltas are therefore compared with
//! [`SLACK_BYTES`], 64 KiB: an order of magnitude above that noise and 1/16 of
//! the smallest quantity measured (1 MiB), so a wrong count cannot hide in it.

use std::fs;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};

use remat::meter::{self, CpuMeter, MemoryMeter, MemoryReport, PhaseSink, PhaseSinkExt, Recorder};

remat::install_counting_allocator!();

const MIB: u64 = 1 << 20;
const SLACK_BYTES: u64 = 64 * 1024;

static SERIAL: Mutex<()> = Mutex::new(());

fn measure_alone() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn assert_near(actual: u64, expected: u64, what: &str) {
    assert!(
        actual.abs_diff(expected) <= SLACK_BYTES,
        "{what}: {actual} bytes, expected {expected} ± {SLACK_BYTES}"
    );
}

fn bytes(count: u64) -> usize {
    usize::try_from(count).expect("fits in usize")
}

fn phase<'r>(report: &'r MemoryReport, name: &str) -> &'r meter::Phase {
    report
        .timeline
        .iter()
        .find(|phase| phase.name == name)
        .unwrap_or_else(|| panic!("no phase {name:?} in {:?}", report.timeline))
}

#[test]
fn the_allocator_is_installed() {
    let _alone = measure_alone();
    assert!(meter::is_installed());
    assert!(CpuMeter.is_measuring());
    assert!(meter::live_bytes() > 0, "the harness itself has allocated");
    assert!(meter::peak_bytes() >= meter::live_bytes());
}

#[test]
fn a_vec_moves_live_and_peak_by_its_size() {
    let _alone = measure_alone();
    let live_before = meter::live_bytes();
    meter::reset_peak();

    let buffer = black_box(vec![1_u8; bytes(4 * MIB)]);
    assert_near(
        meter::live_bytes() - live_before,
        4 * MIB,
        "live after alloc",
    );
    assert!(meter::peak_bytes() >= live_before + 4 * MIB - SLACK_BYTES);

    drop(buffer);
    assert_near(meter::live_bytes(), live_before, "live after free");
    assert!(
        meter::peak_bytes() >= live_before + 4 * MIB - SLACK_BYTES,
        "peak stays"
    );
}

#[test]
fn zeroed_allocations_are_counted() {
    let _alone = measure_alone();
    let live_before = meter::live_bytes();
    let zeros = black_box(vec![0_u64; bytes(MIB / 8)]); // alloc_zeroed
    assert_near(
        meter::live_bytes() - live_before,
        MIB,
        "live after alloc_zeroed",
    );
    drop(zeros);
    assert_near(meter::live_bytes(), live_before, "live after free");
}

#[test]
fn realloc_growth_raises_the_peak_and_shrinking_keeps_it() {
    let _alone = measure_alone();
    let mut buffer: Vec<u8> = Vec::with_capacity(bytes(MIB));
    black_box(&mut buffer);
    let live_at_one_mib = meter::live_bytes();
    meter::reset_peak();

    buffer.reserve_exact(bytes(8 * MIB)); // realloc: 1 MiB -> 8 MiB
    black_box(&mut buffer);
    assert_near(
        meter::live_bytes() - live_at_one_mib,
        7 * MIB,
        "live after growth",
    );
    let peak_after_growth = meter::peak_bytes();
    assert!(peak_after_growth >= live_at_one_mib + 7 * MIB - SLACK_BYTES);

    buffer.shrink_to(bytes(MIB / 2)); // realloc: 8 MiB -> 0.5 MiB
    black_box(&mut buffer);
    assert_near(
        live_at_one_mib - meter::live_bytes(),
        MIB / 2,
        "live after shrink",
    );
    assert!(
        meter::peak_bytes() >= peak_after_growth,
        "shrinking keeps the peak"
    );
}

#[test]
fn reset_peak_lowers_the_peak_to_live() {
    let _alone = measure_alone();
    drop(black_box(vec![1_u8; bytes(16 * MIB)]));
    assert!(meter::peak_bytes() >= meter::live_bytes() + 16 * MIB - SLACK_BYTES);

    meter::reset_peak();
    assert_near(meter::peak_bytes(), meter::live_bytes(), "peak after reset");
    CpuMeter.reset_peak();
    assert_near(CpuMeter.peak_bytes(), CpuMeter.live_bytes(), "trait reset");
}

#[test]
fn a_recorder_times_one_then_three_mib_then_free() {
    let _alone = measure_alone();
    let weights = black_box(vec![1_u8; bytes(2 * MIB)]);
    let mut recorder = Recorder::start(CpuMeter);
    assert_near(recorder.baseline_bytes(), meter::live_bytes(), "baseline");

    recorder.phase("alloc 1 MiB");
    let one = black_box(vec![1_u8; bytes(MIB)]);
    recorder.phase("alloc 3 MiB");
    let three = black_box(vec![1_u8; bytes(3 * MIB)]);
    recorder.phase("transient 5 MiB");
    drop(black_box(vec![1_u8; bytes(5 * MIB)]));
    recorder.phase("free");
    drop(one);
    drop(three);
    let report = recorder.finish();
    println!("{}", report.summary());

    assert_eq!(report.meter, "cpu-heap");
    let first = phase(&report, "alloc 1 MiB");
    let second = phase(&report, "alloc 3 MiB");
    let transient = phase(&report, "transient 5 MiB");
    let free = phase(&report, "free");
    assert_near(
        first.start_bytes,
        0,
        "first start: the weights are baseline",
    );
    assert_near(first.peak_bytes, MIB, "first peak");
    assert_near(second.peak_bytes, 4 * MIB, "second peak");
    assert_near(transient.start_bytes, 4 * MIB, "transient start");
    assert_near(transient.end_bytes, 4 * MIB, "transient end");
    assert_near(transient.peak_bytes, 9 * MIB, "transient peak");
    assert_near(free.end_bytes, 0, "free end");
    assert!(first.peak_bytes < second.peak_bytes && second.peak_bytes < transient.peak_bytes);
    assert!(report.peak_bytes >= 3 * MIB);
    assert_near(report.peak_bytes, 9 * MIB, "report peak");
    assert!(first.end_s <= second.start_s && second.end_s <= transient.start_s);
    drop(weights);
}

#[test]
fn the_recorders_own_allocations_stay_out_of_the_readings() {
    let _alone = measure_alone();
    // One reserved slot and 4000 formatted names: without the bookkeeping
    // correction the timeline alone (4096 slots) would exceed the slack.
    let mut recorder = Recorder::with_capacity(CpuMeter, 1);
    for step in 0..4000 {
        recorder.phase(format!("step {step}"));
    }
    let report = recorder.finish();
    assert!(report.bookkeeping_bytes > 4 * SLACK_BYTES);
    let worst_phase = report.timeline.iter().map(|p| p.peak_bytes).max();
    assert!(worst_phase <= Some(SLACK_BYTES), "{worst_phase:?}");
}

#[test]
fn library_code_marks_into_an_optional_recorder() {
    fn step(sink: &mut dyn PhaseSink) -> Vec<u8> {
        sink.phase("forward");
        let activations = black_box(vec![1_u8; bytes(2 * MIB)]);
        sink.phase_with(|| format!("recompute {}", 0));
        activations
    }

    let _alone = measure_alone();
    let mut recorder = Recorder::start(CpuMeter);
    let kept = step(&mut Some(&mut recorder));
    let report = recorder.finish();
    assert_near(
        phase(&report, "forward").peak_bytes,
        2 * MIB,
        "forward peak",
    );
    assert_near(phase(&report, "recompute 0").start_bytes, 2 * MIB, "held");
    drop(kept);

    let mut nobody: Option<&mut Recorder> = None;
    drop(step(&mut nobody));
}

/// A fresh, empty directory under the system temp dir.
fn scratch_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("remat-meter-it-{label}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

#[test]
fn a_recorded_report_round_trips_through_a_json_file() {
    let report = {
        let _alone = measure_alone();
        let mut recorder = Recorder::start(CpuMeter);
        recorder.phase("work");
        drop(black_box(vec![1_u8; bytes(MIB)]));
        recorder.finish()
    };
    let json = serde_json::to_string(&report).expect("serialise");
    assert_eq!(
        serde_json::from_str::<MemoryReport>(&json).expect("parse"),
        report
    );

    let dir = scratch_dir("round-trip");
    let path = dir.join("memory.json");
    report.write_json(&path).expect("write");
    let names: Vec<_> = fs::read_dir(&dir)
        .expect("list")
        .map(|entry| entry.expect("entry").file_name())
        .collect();
    assert_eq!(names, ["memory.json"], "no temporary file is left");
    assert_eq!(MemoryReport::read_json(&path).expect("read"), report);

    let unwritable = dir.join("missing-dir").join("memory.json");
    let error = report.write_json(&unwritable).expect_err("must fail");
    assert!(
        error
            .to_string()
            .contains(&unwritable.display().to_string()),
        "{error}"
    );
    fs::remove_dir_all(&dir).expect("cleanup");
}
