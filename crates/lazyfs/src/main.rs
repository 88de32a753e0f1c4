//! `holdfast-lazyfs BACKING MOUNTPOINT`: serves the lazy filesystem in the foreground until
//! it is unmounted (`umount MOUNTPOINT`). Control it with
//! `echo crash > MOUNTPOINT/.lazyfs-control` (also `fail-fsync`, `heal`), read its
//! counters with `cat MOUNTPOINT/.lazyfs-control`.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [backing, mountpoint] = args.as_slice() else {
        eprintln!("usage: holdfast-lazyfs BACKING MOUNTPOINT");
        return ExitCode::from(2);
    };
    let session = match holdfast_lazyfs::session(backing, mountpoint) {
        Ok(session) => session,
        Err(error) => {
            eprintln!(
                "holdfast-lazyfs: cannot mount {} over {}: {error}",
                mountpoint.display(),
                backing.display()
            );
            return ExitCode::FAILURE;
        }
    };
    // Scripts and tests wait for this line.
    println!(
        "holdfast-lazyfs mounted {} over {}",
        mountpoint.display(),
        backing.display()
    );
    match session.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("holdfast-lazyfs: {error}");
            ExitCode::FAILURE
        }
    }
}
