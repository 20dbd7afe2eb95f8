//! Writes every target's generated seeds to `fuzz/seeds/TARGET/seed-N` (run from the
//! workspace root or give the seeds directory as the argument).

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let root = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds"));
    for (name, _) in faultline_fuzz::TARGETS {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        for (i, seed) in faultline_fuzz::seeds(name).iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), seed)?;
        }
        println!(
            "{}: {} seeds",
            dir.display(),
            faultline_fuzz::seeds(name).len()
        );
    }
    Ok(())
}
