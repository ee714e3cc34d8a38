//! Slurm job arrays: the sbatch script that runs a comparison (or a sweep) as
//! an array of N tasks, task k running shard k/N of the seed × strategy grid
//! ([`crate::Shard`]) into a records file of its own, so that no two
//! processes ever write one file. `zhijian report` then merges the shard files
//! ([`crate::record::merge_records`]); the script ends with that command.
//!
//! [`ArrayJob::script`] is a pure function of its inputs: it writes no file and
//! reads no environment, so the text is unit-tested here.

use std::path::{Path, PathBuf};

use zhijian_core::{Error, Result};

/// What Slurm is asked to give each task of the array. Resources left `None`
/// are not requested, so the cluster's (or partition's) defaults apply.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources {
    /// `--job-name`; characters other than letters, digits, `.`, `_` and `-`
    /// become `_` (it is also part of the log file names).
    pub job_name: String,
    /// `--cpus-per-task`; LibTorch's CPU threads (`OMP_NUM_THREADS`) follow it.
    pub cpus_per_task: Option<u32>,
    /// `--time`, e.g. `2:00:00` or `1-00:00:00`.
    pub time: Option<String>,
    /// `--mem` (per node), e.g. `8G`.
    pub mem: Option<String>,
    /// `--partition`.
    pub partition: Option<String>,
    /// `--gres=gpu:N`, for `--device cuda`.
    pub gpus: Option<u32>,
    /// Folder of the task logs, `<job name>-<job id>_<task>.out` (Slurm does not
    /// create it: whoever writes the script must).
    pub log_dir: PathBuf,
}

/// A comparison or sweep as a Slurm job array.
#[derive(Clone, Debug, PartialEq)]
pub struct ArrayJob {
    /// The `zhijian` binary every task runs (absolute).
    pub binary: PathBuf,
    /// Folder the tasks run in (absolute): where the command was given, so
    /// that the tasks see what it would have seen.
    pub workdir: PathBuf,
    /// The subcommand and its arguments, paths already absolute, without
    /// `--shard` and `--records` (the script adds its own), e.g.
    /// `["compare", "/abs/exp.toml", "--seeds", "0,1"]`.
    pub command: Vec<String>,
    /// Tasks in the array (N ≥ 1).
    pub tasks: usize,
    /// Runs in the grid (seeds × strategies), for the script's header.
    pub runs: usize,
    /// The records file the shard files merge into (absolute), e.g.
    /// `/abs/results/runs.jsonl`; the shard files go beside it, as
    /// `runs.shard-K-of-N.jsonl`.
    pub records: PathBuf,
    /// Whether `records` already holds records: the merge command then reads
    /// it too, so that earlier runs are kept when it is written anew.
    pub records_exist: bool,
    /// What each task asks for.
    pub resources: Resources,
}

impl ArrayJob {
    /// The records file of task `index`, beside [`Self::records`].
    pub fn shard_records(&self, index: usize) -> PathBuf {
        self.shard_records_named(&index.to_string())
    }

    fn shard_records_named(&self, index: &str) -> PathBuf {
        let stem = self.records.file_stem().map_or("records".into(), |s| s.to_string_lossy().into_owned());
        self.records.with_file_name(format!("{stem}.shard-{index}-of-{}.jsonl", self.tasks))
    }

    /// The command that merges every shard's records into [`Self::records`]
    /// and prints the table (the files are named one by one, so a task that
    /// wrote nothing is an error there, not a silent gap).
    pub fn merge_command(&self) -> Result<String> {
        let mut words = vec![quote_path(&self.binary)?, "report".to_string()];
        if self.records_exist {
            words.push(quote_path(&self.records)?);
        }
        for k in 0..self.tasks {
            words.push(quote_path(&self.shard_records(k))?);
        }
        words.extend(["--out".to_string(), quote_path(&self.records)?]);
        Ok(words.join(" "))
    }

    /// The sbatch script: `#SBATCH` directives, then the command of task
    /// `$SLURM_ARRAY_TASK_ID`, then (as a comment) the merge command.
    pub fn script(&self) -> Result<String> {
        if self.tasks == 0 {
            return Err(Error::Config("a Slurm job array needs at least one task".into()));
        }
        if self.tasks > self.runs {
            return Err(Error::Config(format!(
                "{} Slurm tasks for a grid of {} run(s): task k runs runs k, k+N, …, so {} task(s) would have nothing to do; ask for at most {}",
                self.tasks,
                self.runs,
                self.tasks - self.runs,
                self.runs
            )));
        }
        let r = &self.resources;
        let (n, last) = (self.tasks, self.tasks - 1);
        let sub = self.command.first().map_or("zhijian", String::as_str);
        let mut s = String::from("#!/bin/bash\n");
        s += &format!("# Written by `zhijian {sub} --slurm {n}`: a Slurm job array of {n} task(s) over a grid of {} run(s);\n", self.runs);
        s += &format!("# task K runs shard K/{n} of the grid into its own records file. Submit it with `sbatch` and this file.\n");
        s += &format!("#SBATCH --job-name={}\n", sbatch_value(&job_name(&r.job_name), "job name")?);
        s += &format!("#SBATCH --array=0-{last}\n");
        let log = r.log_dir.join(format!("{}-%A_%a.out", job_name(&r.job_name)));
        let log_text = path_text(&log)?;
        if log_text.matches('%').count() != 2 {
            return Err(Error::Config(format!("Slurm log folder `{}`: a `%` in it would be read as a file name pattern", r.log_dir.display())));
        }
        s += &format!("#SBATCH --output={}\n", sbatch_value(log_text, "log folder")?);
        if let Some(c) = r.cpus_per_task {
            s += &format!("#SBATCH --cpus-per-task={c}\n");
        }
        for (flag, value, what) in [("time", &r.time, "time limit"), ("mem", &r.mem, "memory"), ("partition", &r.partition, "partition")] {
            if let Some(v) = value {
                s += &format!("#SBATCH --{flag}={}\n", sbatch_value(v, what)?);
            }
        }
        if let Some(g) = r.gpus {
            s += &format!("#SBATCH --gres=gpu:{g}\n");
        }
        s += "set -euo pipefail\n";
        s += "# LibTorch's CPU threads: as many as the task was given, not as many as the node has.\n";
        s += "if [ -n \"${SLURM_CPUS_PER_TASK:-}\" ]; then export OMP_NUM_THREADS=\"$SLURM_CPUS_PER_TASK\"; fi\n";
        s += &format!("cd {}\n", quote_path(&self.workdir)?);
        let mut words = vec![quote_path(&self.binary)?];
        words.extend(self.command.iter().map(|a| shell_quote(a)));
        words.push(format!("--shard \"${{SLURM_ARRAY_TASK_ID}}/{n}\""));
        // The task id goes between two quoted halves of the path, outside quotes
        // that would stop the shell expanding it.
        const MARK: &str = "\u{1}TASK\u{1}";
        let records = path_text(&self.shard_records_named(MARK))?.to_string();
        let (before, after) = records.split_once(MARK).expect("the mark is in the file name");
        words.push(format!("--records {}\"${{SLURM_ARRAY_TASK_ID}}\"{}", shell_quote(before), shell_quote(after)));
        s += &format!("exec {}\n", words.join(" "));
        s += "\n# When every task has finished (squeue shows none of the array), merge the shard files\n";
        s += "# into one records file and print the table; duplicates are dropped, conflicts named:\n";
        s += &format!("# {}\n", self.merge_command()?);
        Ok(s)
    }
}

/// `job_name` as Slurm and file names take it.
fn job_name(name: &str) -> String {
    let clean: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    if clean.is_empty() { "zhijian".into() } else { clean }
}

fn path_text(p: &Path) -> Result<&str> {
    p.to_str().ok_or_else(|| Error::Config(format!("path {} is not UTF-8; a Slurm script cannot name it", p.display())))
}

fn quote_path(p: &Path) -> Result<String> {
    path_text(p).map(shell_quote)
}

/// `s` as one word of a POSIX shell command: unchanged when it is made of
/// characters no shell treats specially, else in single quotes, each `'`
/// written `'\''`.
pub fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./,:=+@%".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A value of an `#SBATCH` line. sbatch splits these lines at white space and
/// reads `"` and `\` itself (not as a shell would), so a value with white space
/// is put in double quotes and one with `"`, `\` or a line break is refused.
fn sbatch_value(v: &str, what: &str) -> Result<String> {
    if v.is_empty() || v.contains(['"', '\\', '\n', '\r']) {
        return Err(Error::Config(format!("Slurm {what} `{v}`: must be non-empty, without `\"`, `\\` or line breaks")));
    }
    Ok(if v.contains(char::is_whitespace) || v.contains('#') { format!("\"{v}\"") } else { v.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(tasks: usize) -> ArrayJob {
        ArrayJob {
            binary: "/opt/zhijian/bin/zhijian".into(),
            workdir: "/home/me/work".into(),
            command: ["compare", "/home/me/exps/exp.toml", "--seeds", "0,1"].map(String::from).to_vec(),
            tasks,
            runs: 6,
            records: "/home/me/results/runs.jsonl".into(),
            records_exist: false,
            resources: Resources {
                job_name: "runs".into(),
                cpus_per_task: Some(2),
                time: Some("1:00:00".into()),
                mem: None,
                partition: None,
                gpus: None,
                log_dir: "/home/me/results/slurm-logs".into(),
            },
        }
    }

    #[test]
    fn the_script_runs_shard_k_of_n_into_its_own_file_and_names_the_merge() {
        let text = job(3).script().unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "#!/bin/bash");
        for want in [
            "#SBATCH --job-name=runs",
            "#SBATCH --array=0-2",
            "#SBATCH --output=/home/me/results/slurm-logs/runs-%A_%a.out",
            "#SBATCH --cpus-per-task=2",
            "#SBATCH --time=1:00:00",
            "set -euo pipefail",
            "cd /home/me/work",
            "exec /opt/zhijian/bin/zhijian compare /home/me/exps/exp.toml --seeds 0,1 --shard \"${SLURM_ARRAY_TASK_ID}/3\" \
             --records /home/me/results/runs.shard-\"${SLURM_ARRAY_TASK_ID}\"-of-3.jsonl",
            "# /opt/zhijian/bin/zhijian report /home/me/results/runs.shard-0-of-3.jsonl /home/me/results/runs.shard-1-of-3.jsonl \
             /home/me/results/runs.shard-2-of-3.jsonl --out /home/me/results/runs.jsonl",
        ] {
            assert!(lines.contains(&want), "no line `{want}` in\n{text}");
        }
        assert!(!text.contains("--mem") && !text.contains("--partition") && !text.contains("--gres"), "{text}");
        // Every #SBATCH line comes before the first command: sbatch stops reading them there.
        let first_command = lines.iter().position(|l| !l.starts_with('#') && !l.is_empty()).unwrap();
        assert!(lines[first_command..].iter().all(|l| !l.starts_with("#SBATCH")), "{text}");
        assert_eq!(job(3).shard_records(1), PathBuf::from("/home/me/results/runs.shard-1-of-3.jsonl"));
    }

    #[test]
    fn every_argument_is_quoted_for_the_shell() {
        assert_eq!(shell_quote("lora-r8.train.lr=1e-4,1e-3"), "lora-r8.train.lr=1e-4,1e-3");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("*.train.lr=1e-3"), "'*.train.lr=1e-3'");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
        let mut j = job(2);
        j.binary = "/opt/my tools/zhijian".into();
        j.command = ["sweep", "/home/me/my exps/exp \"1\".toml", "--vary", "lora.methods.0.target=[\"query\", \"value\"]", "--vary", "it's.train.lr=1,2"]
            .map(String::from)
            .to_vec();
        j.records = "/home/me/my results/o'neil.jsonl".into();
        j.records_exist = true;
        j.resources.log_dir = "/home/me/my results/logs".into();
        j.resources.job_name = "runs & more".into();
        j.resources.partition = Some("gpu".into());
        j.resources.mem = Some("8G".into());
        j.resources.gpus = Some(1);
        let text = j.script().unwrap();
        let exec = text.lines().find(|l| l.starts_with("exec ")).unwrap();
        assert_eq!(
            exec,
            "exec '/opt/my tools/zhijian' sweep '/home/me/my exps/exp \"1\".toml' --vary 'lora.methods.0.target=[\"query\", \"value\"]' \
             --vary 'it'\\''s.train.lr=1,2' --shard \"${SLURM_ARRAY_TASK_ID}/2\" \
             --records '/home/me/my results/o'\\''neil.shard-'\"${SLURM_ARRAY_TASK_ID}\"-of-2.jsonl"
        );
        for want in [
            "#SBATCH --job-name=runs___more",
            "#SBATCH --output=\"/home/me/my results/logs/runs___more-%A_%a.out\"",
            "#SBATCH --partition=gpu",
            "#SBATCH --mem=8G",
            "#SBATCH --gres=gpu:1",
        ] {
            assert!(text.lines().any(|l| l == want), "no line `{want}` in\n{text}");
        }
        // The records file already there is read by the merge too, so it keeps its runs.
        assert!(text.contains("report '/home/me/my results/o'\\''neil.jsonl' '/home/me/my results/o'\\''neil.shard-0-of-2.jsonl'"), "{text}");
    }

    /// The quoted words, read back by a real shell, are the words given.
    #[test]
    fn bash_reads_the_quoted_words_back_unchanged() {
        let words = ["plain", "a b", "it's", "", "$HOME `x` \"q\" \\ *", "tab\there", "new\nline"];
        let line = words.iter().map(|w| shell_quote(w)).collect::<Vec<_>>().join(" ");
        let Ok(out) = std::process::Command::new("bash").args(["-c", &format!("printf '%s\\0' {line}")]).output() else {
            eprintln!("no bash here; skipped");
            return;
        };
        let got: Vec<String> = String::from_utf8(out.stdout).unwrap().split_terminator('\0').map(String::from).collect();
        assert_eq!(got, words);

        // The task's command line, run by bash as task 1, gives the arguments meant.
        let mut j = job(2);
        j.binary = "/opt/my tools/zhijian".into();
        j.command = ["compare", "/home/me/it's here/exp.toml"].map(String::from).to_vec();
        j.records = "/home/me/my results/o'neil.jsonl".into();
        let text = j.script().unwrap();
        let exec = text.lines().find(|l| l.starts_with("exec ")).unwrap();
        let line = format!("SLURM_ARRAY_TASK_ID=1; printf '%s\\0' {}", exec.strip_prefix("exec ").unwrap());
        let out = std::process::Command::new("bash").args(["-c", &line]).output().unwrap();
        let got: Vec<String> = String::from_utf8(out.stdout).unwrap().split_terminator('\0').map(String::from).collect();
        let want =
            ["/opt/my tools/zhijian", "compare", "/home/me/it's here/exp.toml", "--shard", "1/2", "--records", "/home/me/my results/o'neil.shard-1-of-2.jsonl"];
        assert_eq!(got, want);
    }

    #[test]
    fn impossible_arrays_and_values_are_refused_with_the_reason() {
        let err = job(7).script().unwrap_err().to_string();
        assert!(err.contains("7 Slurm tasks for a grid of 6 run(s)") && err.contains("at most 6"), "{err}");
        assert!(job(0).script().unwrap_err().to_string().contains("at least one task"));
        let mut j = job(2);
        j.resources.time = Some("1:00:00\n#SBATCH --x".into());
        assert!(j.script().unwrap_err().to_string().contains("Slurm time limit"));
        let mut j = job(2);
        j.resources.log_dir = "/tmp/100%".into();
        assert!(j.script().unwrap_err().to_string().contains("file name pattern"));
    }
}
