//! kafka-eos-proxy patch: the generator reads Apache Kafka's message definitions from a directory (the
//! `common/message/*.json` files of the pinned kafka-clients jar, extracted by
//! `scripts/protocol-codegen`) instead of cloning the Kafka repository, and writes the messages module of
//! the given crate directory.
//!
//!   kafka-protocol-codegen <SPEC_DIR> <CRATE_SRC_DIR>

use failure::{format_err, Error};
use std::fs;
use std::path::PathBuf;

pub mod generate_messages;

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let (Some(spec_dir), Some(src_dir)) = (args.next(), args.next()) else {
        return Err(format_err!(
            "usage: kafka-protocol-codegen <SPEC_DIR> <CRATE_SRC_DIR>"
        ));
    };
    let output_path = fs::canonicalize(PathBuf::from(src_dir).join("messages"))?;
    let messages_module_dir = output_path
        .to_str()
        .ok_or_else(|| format_err!("output path is not UTF-8"))?;

    // Clear output directory
    for file in fs::read_dir(messages_module_dir)? {
        let file = file?;
        if file.file_type()?.is_file() {
            let path = file.path();
            if path.extension() == Some("rs".as_ref()) {
                fs::remove_file(path)?;
            }
        }
    }

    // Find input files
    let mut input_file_paths = Vec::new();
    for file in fs::read_dir(&spec_dir)? {
        let file = file?;
        if file.file_type()?.is_file() {
            let path = file.path();
            if path.extension() == Some("json".as_ref()) {
                input_file_paths.push(path);
            }
        }
    }
    if input_file_paths.is_empty() {
        return Err(format_err!("no message definitions in {spec_dir}"));
    }

    generate_messages::run(messages_module_dir, input_file_paths)?;
    Ok(())
}
