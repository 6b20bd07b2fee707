//! `mla prepare`: tokenize raw text into token shards (see corpus/src/FORMAT.md), also as
//! one worker of several (`--worker I/N`), and `mla prepare --merge DIR`, which joins the
//! workers' partial indexes. SIGTERM/SIGINT stop a preparation within moments, leaving no
//! dataset behind (a second signal ends it at once).

use crate::data::{merge, prepare, DataError, PrepareArgs, MIN_SHARD_TOKENS};

pub fn run(args: &PrepareArgs) -> anyhow::Result<()> {
    if let Some(dir) = &args.merge {
        let report = merge(dir, args.overwrite, args.tokenizer_dir.as_deref())?;
        println!("{report}");
        return Ok(());
    }
    if args.shard_tokens < MIN_SHARD_TOKENS {
        return Err(DataError::InvalidOption {
            key: "--shard-tokens".into(),
            message: format!(
                "{} is below the minimum of {MIN_SHARD_TOKENS} tokens per shard (2^16; smaller \
                 shards only multiply files)",
                args.shard_tokens
            ),
        }
        .into());
    }
    crate::signals::install();
    let mut args = args.clone();
    args.stop = Some(crate::signals::stop_requested);
    let report = prepare(&args)?;
    println!("{report}");
    Ok(())
}
