//! `custody root ...`: the root key's generation, and its rotation.

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::commands::{check_shares_dir, connect, output, print_shares, write_shares, CliResult};
use crate::ConnArgs;

/// `custody root ...`
#[derive(Debug, Subcommand)]
pub enum RootCommand {
    /// Replace the root key (security officer). Every row and key version is re-sealed under the
    /// new root while the server keeps serving; then the old root is destroyed. Prints the new
    /// shares (recovery shares for a PKCS#11 store, whose token wraps the new root): they unseal
    /// the store once the rotation has finished; until then the old ones do. Waits for the end
    /// with a progress bar unless --no-wait; a crash or restart resumes where it stopped.
    #[command(after_help = "\
Examples:
  custody root rotate --shares-dir ./new-shares
  custody root rotate --no-wait --json      # then: custody root status")]
    Rotate {
        /// Write each new share to DIR/share-N.txt (mode 0600) instead of printing them.
        #[arg(long, value_name = "DIR")]
        shares_dir: Option<PathBuf>,
        /// Return once the rotation has started.
        #[arg(long)]
        no_wait: bool,
    },
    /// The root key's generation and any rotation under way (security officer, auditor).
    #[command(after_help = "Examples:\n  custody root status\n  custody root status --json")]
    Status,
}

pub(crate) async fn root(conn: &ConnArgs, cmd: RootCommand, json: bool) -> CliResult<()> {
    match cmd {
        RootCommand::Status => {
            let r = connect(conn).await?.call("Custody.DescribeRoot", json!({})).await?;
            output(json, &r, || println!("{}", describe(&r)));
        }
        RootCommand::Rotate { shares_dir, no_wait } => {
            check_shares_dir(shares_dir.as_deref())?;
            let mut c = connect(conn).await?;
            let mut r = c.call("Custody.RotateRoot", json!({})).await?;
            let shares: Vec<Zeroizing<String>> = r["Shares"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(|s| Zeroizing::new(s.to_string()))
                .collect();
            let files = write_shares(shares_dir.as_deref(), &shares)?;
            if !files.is_empty() {
                r["Shares"] = json!([]);
                r["ShareFiles"] = json!(files);
            }
            let generation = r["Generation"].as_u64().unwrap_or(0);
            if !json {
                println!("Root rotation to generation {generation} started.");
                print_shares("New", &shares, &files);
                println!(
                    "\nThey unseal the store once the rotation has finished ({} needed); until then the current ones do.",
                    r["Threshold"]
                );
            }
            if !no_wait {
                r["Status"] = wait(&mut c, generation, json).await?;
            }
            if json {
                crate::commands::print_json(&r);
            } else if !no_wait {
                println!("Finished: every row is sealed under root generation {generation}; the old root key is destroyed and the old shares unseal nothing.");
            }
        }
    }
    Ok(())
}

/// Polls until the store's current generation is `generation`, with a progress bar over the
/// tables of the current pass on a terminal.
async fn wait(c: &mut custody_client::Client, generation: u64, json: bool) -> CliResult<Value> {
    let bar = if json { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(1) };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} tables  {msg}")
            .expect("a valid template"),
    );
    loop {
        let s = c.call("Custody.DescribeRoot", json!({})).await?;
        if s["Generation"].as_u64() == Some(generation) && s["Rotating"] == false {
            bar.finish_and_clear();
            return Ok(s);
        }
        bar.set_length(s["Tables"].as_u64().unwrap_or(1));
        bar.set_position(s["TablesDone"].as_u64().unwrap_or(0));
        bar.set_message(format!(
            "{} {} ({} rows re-sealed)",
            s["Phase"].as_str().unwrap_or(""),
            s["Table"].as_str().unwrap_or(""),
            s["Resealed"].as_u64().unwrap_or(0)
        ));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn describe(s: &Value) -> String {
    let mut out = format!("Root key generation {}", s["Generation"]);
    if s["Rotating"] == true {
        out.push_str(&format!(
            "\nRotating to generation {}: {} ({} of {} tables in this pass, table {}), {} rows re-sealed; started by {}",
            s["NextGeneration"],
            s["Phase"].as_str().unwrap_or(""),
            s["TablesDone"],
            s["Tables"],
            s["Table"].as_str().unwrap_or("-"),
            s["Resealed"],
            s["StartedBy"].as_str().unwrap_or("")
        ));
    } else {
        out.push_str(" (no rotation under way)");
    }
    out
}
