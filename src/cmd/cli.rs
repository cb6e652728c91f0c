//! Command-line definitions: the only place clap types live. `main.rs` parses and
//! dispatches; `generate` builds the man pages and completions from the same source.
//! Library functions take plain option structs ([`Overrides`], [`LogFormat`]).

use std::path::PathBuf;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand, ValueEnum};

use wedge_autopsy::config::Overrides;
use wedge_autopsy::render::ui::LogFormat;

/// The sweep's default bound on VMs touched at once (`autopsy::sweep`).
const SWEEP_PARALLEL: u16 = wedge_autopsy::autopsy::sweep::DEFAULT_PARALLEL as u16;

#[derive(Debug, Parser)]
#[command(
    name = "wedge-autopsy",
    version,
    about = "Autopsy before shooting: seal a wedged QEMU/KVM VM's evidence into a verified archive",
    subcommand_precedence_over_arg = true,
    after_help = "Examples:\n  wedge-autopsy 102                   capture VM 102 into /var/lib/wedge-autopsy\n  wedge-autopsy 102 --json            the same, one JSON object on stdout\n  wedge-autopsy 102 --dry-run         print the plan, touch nothing\n  wedge-autopsy stacks 4242           thread stacks of any process\n  wedge-autopsy runbook check my.toml check a runbook before deploying it\n\nExit codes: 0 sealed, all steps ok; 1 sealed, some steps failed; 2 bad input;\n3 target refused (not running, not proven, other node); 4 could not seal, or --out below\nthe free-space floor; 5 sealed, but the restart failed or was refused; 6 VM locked by\nanother autopsy, or in its restart cooldown; 10-17 diagnose verdicts (see diagnose --help);\n70 internal error. --dry-run exits with the code the real run would have."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(flatten)]
    pub autopsy: AutopsyArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Settings every subcommand accepts; flags win over the config file.
#[derive(Debug, Args, Clone, Default)]
pub struct Global {
    /// Config file [default: /etc/wedge-autopsy/config.toml]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where QEMU's pidfiles and QMP sockets live [default: /var/run/qemu-server]
    #[arg(long, global = true, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// The Proxmox cluster filesystem [default: /etc/pve]
    #[arg(long, global = true, value_name = "DIR")]
    pub pve_dir: Option<PathBuf>,
    /// Where archives are written [default: /var/lib/wedge-autopsy]
    #[arg(long, global = true, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Time between the two query-blockstats samples, e.g. 2s, 500ms, 0 [default: 2s]
    #[arg(long, global = true, value_name = "DURATION")]
    pub sample_interval: Option<String>,
    /// This node's name as the cluster knows it [default: short hostname]
    #[arg(long, global = true, value_name = "NAME")]
    pub node: Option<String>,
    /// Where separate debug files (symbols, DWARF) are searched by build-id and .gnu_debuglink; repeatable, in order [default: /usr/lib/debug]
    #[arg(long = "debug-dir", global = true, value_name = "DIR")]
    pub debug_dir: Vec<PathBuf>,
    /// Where Proxmox writes its logs (vzdump/, pve/tasks/) [default: /var/log]
    #[arg(long, global = true, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
    /// Log format on stderr: text or json (one object per line) [default: text; the journal under systemd]
    #[arg(long, global = true, value_name = "FORMAT", value_parser = log_format_parser())]
    pub log_format: Option<LogFormat>,
    /// More detail on stderr: -v adds info logs and step notes, -vv debug
    #[arg(short = 'v', long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// `--log-format`: `text` or `json`, into the library's plain [`LogFormat`].
fn log_format_parser() -> impl TypedValueParser<Value = LogFormat> {
    PossibleValuesParser::new(["text", "json"]).map(|s| if s == "json" { LogFormat::Json } else { LogFormat::Text })
}

impl Global {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            config: self.config.clone(),
            run_dir: self.run_dir.clone(),
            pve_dir: self.pve_dir.clone(),
            out: self.out.clone(),
            sample_interval: self.sample_interval.clone(),
            node: self.node.clone(),
            debug_dirs: self.debug_dir.clone(),
            log_dir: self.log_dir.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StacksArg {
    Native,
    Gdb,
    None,
}

/// The autopsy itself: `wedge-autopsy <VMID>`.
#[derive(Debug, Args, Default)]
pub struct AutopsyArgs {
    /// The VMs to capture, as `qm list` shows them (100–999999999); several are captured in parallel
    #[arg(value_name = "VMID")]
    pub vmids: Vec<String>,
    /// Also capture every running VM on this node that `diagnose` finds wedged (block-path-frozen, proven or suspected, or main-loop-wedged). With --then-restart only those proven stuck inside QEMU are restarted
    #[arg(long)]
    pub all_wedged: bool,
    /// With --all-wedged --then-restart: also restart VMs whose frozen block path is only suspected (no in-flight view, e.g. LSI without a guest agent). An idle disk looks the same: use with care
    #[arg(long, requires = "all_wedged")]
    pub restart_suspected: bool,
    /// How many VMs to capture at once
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub parallel: u16,
    /// With --all-wedged: how many VMs the finding sweep touches at once (QMP commands, /proc reads)
    #[arg(long, value_name = "N", default_value_t = SWEEP_PARALLEL, requires = "all_wedged", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub sweep_parallel: u16,
    /// Print one JSON object on stdout (archive, sha256, vmid, pid, steps, sealed)
    #[arg(long)]
    pub json: bool,
    /// Print the plan and touch nothing; runs the real run's checks (VMID, proof, node, free space, lock, cooldown) and exits with the code the real run would have
    #[arg(long)]
    pub dry_run: bool,
    /// Free space --out must have before a capture starts, e.g. 200M; 0 switches the check off [default: [retention] min_free if set, else what the runbook may write: megabytes, gigabytes with a core dump]
    #[arg(long, value_name = "SIZE")]
    pub min_free: Option<String>,
    /// Stack method: native (ptrace snapshot, gdb fallback), gdb, or none
    #[arg(long, value_enum, value_name = "METHOD")]
    pub stacks: Option<StacksArg>,
    /// Runbook name or path [default: qemu-wedge]
    #[arg(long, value_name = "NAME|PATH")]
    pub runbook: Option<String>,
    /// Capture without QMP (when the socket is missing or must not be touched)
    #[arg(long)]
    pub no_qmp: bool,
    /// Why this autopsy was started (recorded in the manifest), e.g. an incident id
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    /// Only what a cron job needs: errors and failed steps on stderr, the archive path on stdout
    #[arg(long, short)]
    pub quiet: bool,
    /// After the archive is sealed and verified: stop the old QEMU for good and start a new one.
    /// Exit 5 if the restart failed or was refused, 6 if the VM is locked or in its restart cooldown
    #[arg(long)]
    pub then_restart: bool,
    /// With --then-restart: ignore the restart cooldown (restart.cooldown, default 30m)
    #[arg(long, requires = "then_restart")]
    pub force: bool,
    /// With --then-restart: restart an HA-managed VM through ha-manager instead of refusing
    #[arg(long, requires = "then_restart")]
    pub allow_ha: bool,
    /// With --then-restart: graceful stop time before escalating, e.g. 30s [default: restart.timeout]
    #[arg(long, value_name = "DURATION", requires = "then_restart")]
    pub restart_timeout: Option<String>,
    /// Path of Proxmox's qm [default: config key qm, else qm on PATH]
    #[arg(long, value_name = "PATH")]
    pub qm: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The verdict for a live VM without an archive; exit code by verdict (example: wedge-autopsy diagnose 102 --window 5s)
    #[command(
        after_help = "Exit codes: 0 healthy, 10 inconclusive, 11 block-path-frozen, 12 main-loop-wedged,\n13 qmp-unreachable, 14 paused, 15 io-error, 16 process-stopped; 2 bad input, 3 refused."
    )]
    Diagnose {
        /// The VM, as `qm list` shows it
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        vmid: Option<String>,
        /// Every running VM on this node in one sweep (one window for all); exit code is the worst verdict's
        #[arg(long)]
        all: bool,
        /// With --all: how many VMs are touched at once (QMP commands, /proc reads)
        #[arg(long, value_name = "N", default_value_t = SWEEP_PARALLEL, requires = "all", value_parser = clap::value_parser!(u16).range(1..=256))]
        parallel: u16,
        /// Time between the two blockstats samples [default: sample_interval]
        #[arg(long, value_name = "DURATION")]
        window: Option<String>,
        /// Idle time beyond which frozen counters alone mean a frozen block path [default: 30s]
        #[arg(long, value_name = "DURATION")]
        min_idle: Option<String>,
        /// One JSON object (per VM with --all): verdict, facts, findings
        #[arg(long)]
        json: bool,
    },
    /// Thread stacks of any process, like eu-stack: native snapshot, threads frozen ~1 ms (example: wedge-autopsy stacks 4242 --json)
    Stacks {
        /// The process id (any process: you name it, you own the consequences)
        pid: i32,
        /// JSON (the same document as stacks/threads.json) instead of text
        #[arg(long)]
        json: bool,
        /// Resolve file:line and inlined frames from debug info (slower, after the threads run again)
        #[arg(long)]
        lines: bool,
        /// native (default) or gdb (stops every thread for the whole run)
        #[arg(long, value_enum, default_value = "native")]
        method: StacksArg,
    },
    /// Every VM config on this node: risk stack, odd ones out, pending changes (example: wedge-autopsy audit --json)
    Audit {
        /// JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Delete old archives by the retention limits (example: wedge-autopsy prune --keep 20 --dry-run)
    #[command(
        after_help = "Examples:\n  wedge-autopsy prune --dry-run                 what the configured [retention] would remove\n  wedge-autopsy prune --max-age 90d --max-bytes 10G\n\nOnly autopsy-*.tar.zst archives and their .sha256/.restart.json/.summary.md sidecars in\nthe output directory are ever removed, oldest first; the newest archive never is.\nLimits not given as flags come from [retention] in the config file."
    )]
    Prune(PruneArgs),
    /// List, show, check runbooks (example: wedge-autopsy runbook check my.toml)
    Runbook {
        #[command(subcommand)]
        action: RunbookAction,
    },
    /// Known-bug signatures: list, show, check (example: wedge-autopsy signatures check my.toml)
    Signatures {
        #[command(subcommand)]
        action: SignaturesAction,
    },
    /// HTTP service: alerts (Alertmanager, Grafana) and API calls start autopsies; results go to the ticket (example: wedge-autopsy serve --listen 127.0.0.1:9171)
    #[command(
        after_help = "Configured under [serve] in the config file; see docs/serve.md.\nStops on SIGTERM after running autopsies seal."
    )]
    Serve {
        /// Address to listen on [default: [serve] listen, else 127.0.0.1:9171]
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Option<String>,
    },
    /// Read a sealed archive: summary, contents, hash check, one file (example: wedge-autopsy inspect a.tar.zst --verify)
    Inspect {
        /// The .tar.zst archive
        archive: PathBuf,
        /// Check every file's SHA-256 against the manifest
        #[arg(long)]
        verify: bool,
        /// JSON instead of text
        #[arg(long)]
        json: bool,
        /// Print one file from the archive
        #[arg(long, value_name = "PATH")]
        cat: Option<String>,
        /// Unwind and name every thread again from the archived raw snapshot, with the debug info installed now (--debug-dir; debuginfod only when DEBUGINFOD_URLS is set)
        #[arg(long, conflicts_with_all = ["cat", "qemu_state"])]
        resymbolize: bool,
        /// QEMU's coroutines and timers from the archived core (core/qemu.core), read by gdb with QEMU's gdb scripts
        #[arg(long, conflicts_with = "cat")]
        qemu_state: bool,
        /// QEMU's scripts/qemu-gdb.py (from the QEMU source: `apt-get source qemu`) [default: /usr/share/wedge-autopsy/qemu-gdb/qemu-gdb.py]
        #[arg(long, value_name = "FILE", requires = "qemu_state")]
        qemu_gdb_script: Option<PathBuf>,
    },
    /// Packaging assets: man pages, completions, config, runbook docs (example: wedge-autopsy generate man DIR)
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: GenerateWhat,
    },
}

/// `prune`: flags override `[retention]`; `0` switches a limit off.
#[derive(Debug, Args, Clone, Default)]
pub struct PruneArgs {
    /// Keep at most N archives, newest first [default: retention.keep]
    #[arg(long, value_name = "N")]
    pub keep: Option<usize>,
    /// Remove archives older than this, e.g. 90d [default: retention.max_age]
    #[arg(long, value_name = "DURATION")]
    pub max_age: Option<String>,
    /// Keep all archives together under this size, e.g. 10G [default: retention.max_bytes]
    #[arg(long, value_name = "SIZE")]
    pub max_bytes: Option<String>,
    /// Remove the oldest archives until this much is free, e.g. 1G [default: retention.min_free]
    #[arg(long, value_name = "SIZE")]
    pub min_free: Option<String>,
    /// Print what would be removed, remove nothing
    #[arg(long)]
    pub dry_run: bool,
}

/// Hidden `generate`: packaging assets from these very definitions.
#[derive(Debug, Subcommand)]
pub enum GenerateWhat {
    /// Man pages (section 1), one per subcommand, into DIR (example: wedge-autopsy generate man target/assets/man)
    Man { dir: PathBuf },
    /// bash, zsh and fish completions into DIR (example: wedge-autopsy generate completions target/assets/completions)
    Completions { dir: PathBuf },
    /// The commented default config file on stdout (example: wedge-autopsy generate config > packaging/config.toml)
    Config,
    /// The runbook reference (markdown) on stdout (example: wedge-autopsy generate runbook-docs > docs/runbooks.md)
    RunbookDocs,
}

#[derive(Debug, Subcommand)]
pub enum RunbookAction {
    /// Runbooks reachable by name (example: wedge-autopsy runbook list)
    List,
    /// Print a runbook's text (example: wedge-autopsy runbook show qemu-wedge)
    Show { name: String },
    /// Check runbook files; errors name file, line and key (example: wedge-autopsy runbook check my.toml)
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// JSON Schema of the runbook format, for editors (example: wedge-autopsy runbook schema > runbook.schema.json)
    Schema,
}

#[derive(Debug, Subcommand)]
pub enum SignaturesAction {
    /// Signatures in use: built-in and from signature_dir (example: wedge-autopsy signatures list)
    List,
    /// Print a signature's file (example: wedge-autopsy signatures show qemu-3144-throttle-group-iothreads)
    Show { id: String },
    /// Check signature files; errors name file, line and key (example: wedge-autopsy signatures check my.toml)
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_flags_before_a_subcommand_and_several_vmids() {
        let c = Cli::try_parse_from(["wedge-autopsy", "--out", "/x", "runbook", "list"]).unwrap();
        assert!(matches!(c.command, Some(Command::Runbook { action: RunbookAction::List })));
        assert_eq!(c.global.out.as_deref(), Some(std::path::Path::new("/x")));
        let c = Cli::try_parse_from(["wedge-autopsy", "--out", "/x", "101", "102", "--json"]).unwrap();
        assert!(c.command.is_none());
        assert_eq!(c.autopsy.vmids, ["101", "102"]);
        assert!(c.autopsy.json);
        let c = Cli::try_parse_from(["wedge-autopsy", "diagnose", "102", "--window", "5s", "--run-dir", "/r"]).unwrap();
        assert!(matches!(c.command, Some(Command::Diagnose { .. })));
        assert_eq!(c.global.run_dir.as_deref(), Some(std::path::Path::new("/r")));
    }
}
