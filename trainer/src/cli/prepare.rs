//! `mla prepare`: tokenize raw text into token shards (see trainer/src/data/FORMAT.md).
//! SIGTERM/SIGINT stop it within moments, leaving no dataset behind (a second signal ends it
//! at once).

use crate::data::{prepare, PrepareArgs};

pub fn run(args: &PrepareArgs) -> anyhow::Result<()> {
    crate::signals::install();
    let report = prepare(args)?;
    println!("{report}");
    Ok(())
}
