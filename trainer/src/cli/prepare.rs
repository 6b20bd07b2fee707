//! `mla prepare`: tokenize raw text into token shards (see trainer/src/data/FORMAT.md).

use crate::data::{prepare, PrepareArgs};

pub fn run(args: &PrepareArgs) -> anyhow::Result<()> {
    let report = prepare(args)?;
    println!("{report}");
    Ok(())
}
