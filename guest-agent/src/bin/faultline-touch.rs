//! `faultline-touch [MIB]`: the test workload for the guest agent. It allocates a buffer of
//! MIB mebibytes (default 64), writes every page, prints the buffer's guest-physical frames
//! as one machine-readable line
//!
//! ```text
//! TOUCH_PFNS <first>+<count>,<first>+<count>,...
//! ```
//!
//! (coalesced, sorted; reading frame numbers from `/proc/self/pagemap` needs root), then
//! keeps writing every page every 100 ms so the buffer stays hot. If the kernel moves pages
//! (compaction, huge-page collapse) it prints the new frames again.

use std::io::Write;
use std::time::{Duration, Instant};

use guest_agent::procfs::{page_size, Pagemap, PM_PFN_MASK, PM_PRESENT};
use guest_agent::proto::PfnRange;
use guest_agent::scan::ranges::RangeBuilder;

/// The frames backing `len` bytes at `addr`, coalesced; `None` if pagemap cannot say.
fn frames(addr: u64, len: usize) -> Option<Vec<PfnRange>> {
    let page = page_size();
    let pm = Pagemap::open(std::process::id() as i32).ok()?;
    let mut entries = vec![0u64; len / page as usize];
    let n = pm.read(addr, &mut entries).ok()?;
    let mut b = RangeBuilder::new();
    for &e in &entries[..n] {
        let pfn = e & PM_PFN_MASK;
        if e & PM_PRESENT == 0 || pfn == 0 {
            // Not present, or frame numbers hidden (not root).
            return None;
        }
        b.push_pfn(pfn);
    }
    Some(b.finish())
}

fn print_frames(f: &Option<Vec<PfnRange>>) {
    let mut out = std::io::stdout().lock();
    match f {
        Some(r) => {
            let list: Vec<String> = r
                .iter()
                .map(|r| format!("{}+{}", r.first, r.count))
                .collect();
            let _ = writeln!(out, "TOUCH_PFNS {}", list.join(","));
        }
        None => {
            let _ = writeln!(out, "TOUCH_PFNS unavailable (run as root)");
        }
    }
    let _ = out.flush();
}

/// Writes one byte in every page of the buffer.
fn touch(buf: *mut u8, len: usize, page: usize, value: u8) {
    for off in (0..len).step_by(page) {
        // SAFETY: `off < len` and `buf` is a mapping of `len` writable bytes that lives
        // as long as the process; volatile so the writes are not optimised away.
        unsafe { std::ptr::write_volatile(buf.add(off), value) };
    }
}

fn main() {
    let mib: usize = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 64,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("usage: faultline-touch [MIB]");
            std::process::exit(2);
        }
    };
    let len = mib << 20;
    let page = page_size() as usize;
    // SAFETY: an anonymous private mapping; the arguments describe no existing memory.
    let buf = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if buf == libc::MAP_FAILED {
        eprintln!(
            "faultline-touch: mmap of {mib} MiB failed: {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
    let buf = buf.cast::<u8>();
    let started = Instant::now();
    touch(buf, len, page, 1);
    let mut current = frames(buf as u64, len);
    println!(
        "TOUCH_READY mib={mib} pages={} populate_ms={}",
        len / page,
        started.elapsed().as_millis()
    );
    print_frames(&current);
    let mut round = 0u64;
    loop {
        round += 1;
        touch(buf, len, page, round as u8);
        std::thread::sleep(Duration::from_millis(100));
        if round.is_multiple_of(10) {
            let now = frames(buf as u64, len);
            if now != current {
                current = now;
                print_frames(&current);
            }
        }
    }
}
