//! Command lines that start one multi-rank (MPI) job on some of the allocation's nodes.
//!
//! The launcher runs each MPI job with the system's MPI launcher: `aprun` on Cray (Theta),
//! MPICH's hydra `mpiexec`, `srun` under Slurm, or a site's own command given as a template. This
//! module only builds the argv (a `Vec<String>`, never a shell string, so arguments with spaces
//! survive); running it is the launcher's job. The program for each kind comes from
//! [`LaunchConfig`] so sites and tests can point at their own.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use minijinja::{context, Environment, UndefinedBehavior};

use crate::allocation::Allocation;
use crate::error::{Error, Result};
use crate::scheduler::SchedulerKind;

/// How ranks are pinned to cores (`aprun -cc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuAffinity {
    /// No pinning.
    #[default]
    None,
    /// Each rank pinned to `threads_per_rank` consecutive CPUs.
    Depth,
}

impl CpuAffinity {
    /// `none` or `depth`.
    pub fn name(self) -> &'static str {
        match self {
            CpuAffinity::None => "none",
            CpuAffinity::Depth => "depth",
        }
    }
}

impl fmt::Display for CpuAffinity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CpuAffinity {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "" => Ok(CpuAffinity::None),
            "depth" => Ok(CpuAffinity::Depth),
            _ => Err(Error::UnknownCpuAffinity(s.to_string())),
        }
    }
}

/// One MPI job to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpiLaunchSpec {
    /// Total ranks (num_nodes × ranks_per_node).
    pub num_ranks: usize,
    /// Ranks on each node.
    pub ranks_per_node: usize,
    /// Threads (cores) per rank (`aprun -d`).
    pub threads_per_rank: usize,
    /// Hardware threads per core (`aprun -j`).
    pub threads_per_core: usize,
    /// Pinning of ranks to cores.
    pub cpu_affinity: CpuAffinity,
    /// The nodes to run on (host names; Cobalt node ids or `nidNNNNN` names for aprun).
    pub nodes: Vec<String>,
    /// Environment variables the ranks need.
    pub env: Vec<(String, String)>,
    /// Extra launcher flags, already split into words (from the job's mpi_flags).
    pub mpi_flags: Vec<String>,
    /// The program and its arguments.
    pub argv: Vec<String>,
}

/// Which MPI launcher to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MpiLauncherKind {
    /// Cray ALPS `aprun` (Theta).
    Aprun,
    /// MPICH hydra `mpiexec`.
    Mpich,
    /// Slurm `srun`.
    Srun,
    /// A site's own command: a minijinja template rendered with the spec, then split like a
    /// shell would.
    Template(String),
}

impl MpiLauncherKind {
    /// The kind for this environment: an explicit setting wins (`aprun`, `mpich`/`mpiexec`/
    /// `hydra`, `srun`, or a template containing `{{`); else inside a Cobalt job on a Cray
    /// (`COBALT_PARTNAME` set) → aprun; a Cobalt cluster job (`COBALT_NODEFILE` only, like Cooley)
    /// → mpich; inside Slurm → srun; otherwise mpich.
    pub fn detect(env: &HashMap<String, String>, setting: Option<&str>) -> Result<Self> {
        if let Some(s) = setting.map(str::trim).filter(|s| !s.is_empty()) {
            return s.parse();
        }
        let has = |k: &str| env.get(k).is_some_and(|v| !v.trim().is_empty());
        if has("COBALT_JOBID") {
            if !has("COBALT_PARTNAME") && has("COBALT_NODEFILE") {
                return Ok(MpiLauncherKind::Mpich);
            }
            return Ok(MpiLauncherKind::Aprun);
        }
        if has("SLURM_JOB_ID") || has("SLURM_JOBID") {
            return Ok(MpiLauncherKind::Srun);
        }
        Ok(MpiLauncherKind::Mpich)
    }
}

impl FromStr for MpiLauncherKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.contains("{{") {
            return Ok(MpiLauncherKind::Template(s.to_string()));
        }
        match s.trim().to_ascii_lowercase().as_str() {
            "aprun" => Ok(MpiLauncherKind::Aprun),
            "mpich" | "mpiexec" | "hydra" | "mpirun" => Ok(MpiLauncherKind::Mpich),
            "srun" | "slurm" => Ok(MpiLauncherKind::Srun),
            _ => Err(Error::UnknownMpiLauncher(s.to_string())),
        }
    }
}

/// The programs behind each launcher kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchConfig {
    /// `aprun` program.
    pub aprun_exe: PathBuf,
    /// `mpiexec` program (MPICH hydra).
    pub mpiexec_exe: PathBuf,
    /// `srun` program.
    pub srun_exe: PathBuf,
}

impl Default for LaunchConfig {
    fn default() -> Self {
        LaunchConfig {
            aprun_exe: "aprun".into(),
            mpiexec_exe: "mpiexec".into(),
            srun_exe: "srun".into(),
        }
    }
}

/// The argv that starts `spec` with launcher `kind`.
pub fn build_mpi_command(
    kind: &MpiLauncherKind,
    config: &LaunchConfig,
    spec: &MpiLaunchSpec,
) -> Result<Vec<String>> {
    validate(spec)?;
    match kind {
        MpiLauncherKind::Aprun => aprun(config, spec),
        MpiLauncherKind::Mpich => Ok(mpich(config, spec)),
        MpiLauncherKind::Srun => Ok(srun(config, spec)),
        MpiLauncherKind::Template(t) => template(t, spec),
    }
}

/// The command that starts the launcher itself (`launcher_argv`: `balsam-mpi-launcher` and its
/// options) inside the batch job `alloc`, as the shipped job templates do, so that
/// `balsam launcher` in a user's template runs where the templates' launcher would:
///
/// - `alone` (job mode mpi): the launcher runs here, on the head (MOM) node, and starts every job
///   with the MPI launch command;
/// - a local job: `mpiexec -n NODES+1`, a master and one worker per requested node on this host;
/// - otherwise one rank on each node of the allocation and none on the head node: `aprun -n N
///   -N 1 -cc none`, `mpiexec -n N -ppn 1 -hosts ...`, `srun -n N --ntasks-per-node=1 --overlap
///   ...`, or the site's template with one rank per node.
///
/// `cpus_on_node` is Slurm's `SLURM_CPUS_ON_NODE`: the launcher's rank gets every CPU of its node,
/// unbound, so the jobs it starts can use them.
pub fn launcher_ranks_command(
    alloc: &Allocation,
    kind: &MpiLauncherKind,
    config: &LaunchConfig,
    alone: bool,
    cpus_on_node: Option<usize>,
    launcher_argv: &[String],
) -> Result<Vec<String>> {
    if launcher_argv.is_empty() {
        return Err(Error::BadRequest("no launcher program to start".into()));
    }
    if alone {
        return Ok(launcher_argv.to_vec());
    }
    let n = alloc.node_count.max(1);
    let mut a: Vec<String> = match (alloc.scheduler, kind) {
        (SchedulerKind::Local, _) => {
            vec![exe(&config.mpiexec_exe), "-n".into(), (n + 1).to_string()]
        }
        (_, MpiLauncherKind::Aprun) => vec![
            exe(&config.aprun_exe),
            "-n".into(),
            n.to_string(),
            "-N".into(),
            "1".into(),
            "-cc".into(),
            "none".into(),
        ],
        (_, MpiLauncherKind::Mpich) => {
            let mut a = vec![
                exe(&config.mpiexec_exe),
                "-n".into(),
                n.to_string(),
                "-ppn".into(),
                "1".into(),
            ];
            if !alloc.nodes.is_empty() {
                a.extend(["-hosts".into(), alloc.nodes.join(",")]);
            }
            a
        }
        (_, MpiLauncherKind::Srun) => vec![
            exe(&config.srun_exe),
            "-n".into(),
            n.to_string(),
            "--ntasks-per-node=1".into(),
            // The launcher's MPI jobs are job steps of their own: without --overlap they would
            // wait, forever, for this step to give back the CPUs it holds.
            "--overlap".into(),
            format!("--cpus-per-task={}", cpus_on_node.unwrap_or(1).max(1)),
            "--cpu-bind=none".into(),
        ],
        (_, MpiLauncherKind::Template(t)) => {
            let spec = MpiLaunchSpec {
                num_ranks: n,
                ranks_per_node: 1,
                threads_per_rank: 1,
                threads_per_core: 1,
                cpu_affinity: CpuAffinity::None,
                nodes: alloc.nodes.clone(),
                env: Vec::new(),
                mpi_flags: Vec::new(),
                argv: launcher_argv.to_vec(),
            };
            return template(t, &spec);
        }
    };
    a.extend(launcher_argv.iter().cloned());
    Ok(a)
}

fn validate(spec: &MpiLaunchSpec) -> Result<()> {
    if spec.argv.is_empty() {
        return Err(Error::BadRequest(
            "the MPI job has no program to run".into(),
        ));
    }
    if spec.num_ranks == 0 || spec.ranks_per_node == 0 {
        return Err(Error::BadRequest(format!(
            "an MPI job needs at least 1 rank and 1 rank per node (got {} ranks, {} per node)",
            spec.num_ranks, spec.ranks_per_node
        )));
    }
    if let Some((k, _)) = spec
        .env
        .iter()
        .find(|(k, _)| k.is_empty() || k.contains('='))
    {
        return Err(Error::BadRequest(format!(
            "environment variable name {k:?} is empty or contains '='"
        )));
    }
    Ok(())
}

fn exe(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The node count a spec spans: its node list, else enough nodes for its ranks.
fn num_nodes(spec: &MpiLaunchSpec) -> usize {
    if spec.nodes.is_empty() {
        spec.num_ranks.div_ceil(spec.ranks_per_node)
    } else {
        spec.nodes.len()
    }
}

/// `aprun -n N -N RPN -d D -j J -cc AFFINITY -L nid,... -e K=V ... [mpi_flags] program args`.
fn aprun(config: &LaunchConfig, spec: &MpiLaunchSpec) -> Result<Vec<String>> {
    let mut a = vec![
        exe(&config.aprun_exe),
        "-n".into(),
        spec.num_ranks.to_string(),
        "-N".into(),
        spec.ranks_per_node.to_string(),
        "-d".into(),
        spec.threads_per_rank.max(1).to_string(),
        "-j".into(),
        spec.threads_per_core.max(1).to_string(),
        "-cc".into(),
        spec.cpu_affinity.name().into(),
    ];
    if !spec.nodes.is_empty() {
        let nids = spec
            .nodes
            .iter()
            .map(|n| aprun_nid(n))
            .collect::<Result<Vec<_>>>()?;
        a.extend(["-L".into(), nids.join(",")]);
    }
    for (k, v) in &spec.env {
        a.extend(["-e".into(), format!("{k}={v}")]);
    }
    a.extend(spec.mpi_flags.iter().cloned());
    a.extend(spec.argv.iter().cloned());
    Ok(a)
}

/// A node as `aprun -L` takes it: `nid01001` or `01001` → `1001`.
pub fn aprun_nid(node: &str) -> Result<String> {
    let digits = node.trim().strip_prefix("nid").unwrap_or(node.trim());
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::BadNodeList {
            input: node.to_string(),
            problem: "aprun -L needs numeric node ids (like 1001 or nid01001)".into(),
        });
    }
    let trimmed = digits.trim_start_matches('0');
    Ok(if trimmed.is_empty() { "0" } else { trimmed }.to_string())
}

/// `mpiexec -n N -ppn RPN -hosts h1,h2 -env K V ... [mpi_flags] program args`.
fn mpich(config: &LaunchConfig, spec: &MpiLaunchSpec) -> Vec<String> {
    let mut a = vec![
        exe(&config.mpiexec_exe),
        "-n".into(),
        spec.num_ranks.to_string(),
        "-ppn".into(),
        spec.ranks_per_node.to_string(),
    ];
    if !spec.nodes.is_empty() {
        a.extend(["-hosts".into(), spec.nodes.join(",")]);
    }
    for (k, v) in &spec.env {
        a.extend(["-env".into(), k.clone(), v.clone()]);
    }
    a.extend(spec.mpi_flags.iter().cloned());
    a.extend(spec.argv.iter().cloned());
    a
}

/// `srun -n N --ntasks-per-node RPN --nodelist h1,h2 -N NODES [--cpus-per-task D]
/// [--export=ALL,K=V,...] [mpi_flags] program args`. srun's `--export` splits on commas, so
/// variables whose value contains one are passed through `env K=V` in front of the program.
fn srun(config: &LaunchConfig, spec: &MpiLaunchSpec) -> Vec<String> {
    let mut a = vec![
        exe(&config.srun_exe),
        "-n".into(),
        spec.num_ranks.to_string(),
        "--ntasks-per-node".into(),
        spec.ranks_per_node.to_string(),
    ];
    if !spec.nodes.is_empty() {
        a.extend(["--nodelist".into(), spec.nodes.join(",")]);
    }
    a.extend(["-N".into(), num_nodes(spec).to_string()]);
    if spec.threads_per_rank > 1 {
        a.extend(["--cpus-per-task".into(), spec.threads_per_rank.to_string()]);
    }
    let (plain, with_comma): (Vec<_>, Vec<_>) =
        spec.env.iter().partition(|(_, v)| !v.contains(','));
    if !plain.is_empty() {
        let vars: Vec<String> = plain.iter().map(|(k, v)| format!("{k}={v}")).collect();
        a.push(format!("--export=ALL,{}", vars.join(",")));
    }
    a.extend(spec.mpi_flags.iter().cloned());
    if !with_comma.is_empty() {
        a.push("env".into());
        a.extend(with_comma.iter().map(|(k, v)| format!("{k}={v}")));
    }
    a.extend(spec.argv.iter().cloned());
    a
}

/// Renders a site template, then splits it into words like a shell would.
fn template(text: &str, spec: &MpiLaunchSpec) -> Result<Vec<String>> {
    let name = "MPI launch template (setting MPI_LAUNCHER)";
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
    let env_pairs: Vec<Vec<String>> = spec
        .env
        .iter()
        .map(|(k, v)| vec![k.clone(), v.clone()])
        .collect();
    let ctx = context! {
        num_ranks => spec.num_ranks,
        ranks_per_node => spec.ranks_per_node,
        num_nodes => num_nodes(spec),
        threads_per_rank => spec.threads_per_rank,
        threads_per_core => spec.threads_per_core,
        cpu_affinity => spec.cpu_affinity.name(),
        nodes => spec.nodes.clone(),
        hosts => spec.nodes.join(","),
        env => env_pairs,
        mpi_flags => shell_words::join(&spec.mpi_flags),
        command => shell_words::join(&spec.argv),
    };
    let rendered = env
        .render_named_str(name, text, ctx)
        .map_err(|e| crate::template::template_error(name, &e))?;
    let words = shell_words::split(&rendered).map_err(|e| Error::Template {
        name: name.into(),
        line: None,
        problem: format!("the rendered command {rendered:?} cannot be split into words: {e}"),
    })?;
    if words.is_empty() {
        return Err(Error::Template {
            name: name.into(),
            line: None,
            problem: "it rendered to an empty command".into(),
        });
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(scheduler: SchedulerKind, nodes: &[&str]) -> Allocation {
        Allocation {
            scheduler,
            job_id: "1".into(),
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            node_count: nodes.len(),
            end_time: None,
        }
    }

    #[test]
    fn launcher_ranks_one_per_node_as_the_templates() {
        let argv = vec!["/b/balsam-mpi-launcher".to_string(), "--consume-all".into()];
        let c = LaunchConfig::default();
        let run = |a: &Allocation, k: MpiLauncherKind, alone: bool| {
            launcher_ranks_command(a, &k, &c, alone, Some(64), &argv)
                .unwrap()
                .join(" ")
        };
        let theta = alloc(SchedulerKind::Cobalt, &["1001", "1002"]);
        assert_eq!(
            run(&theta, MpiLauncherKind::Aprun, false),
            "aprun -n 2 -N 1 -cc none /b/balsam-mpi-launcher --consume-all"
        );
        // In mpi mode the launcher runs alone where the script runs.
        assert_eq!(
            run(&theta, MpiLauncherKind::Aprun, true),
            "/b/balsam-mpi-launcher --consume-all"
        );
        let pbs = alloc(SchedulerKind::Pbs, &["x1", "x2", "x3"]);
        assert_eq!(
            run(&pbs, MpiLauncherKind::Mpich, false),
            "mpiexec -n 3 -ppn 1 -hosts x1,x2,x3 /b/balsam-mpi-launcher --consume-all"
        );
        let slurm = alloc(SchedulerKind::Slurm, &["n1", "n2"]);
        assert_eq!(
            run(&slurm, MpiLauncherKind::Srun, false),
            "srun -n 2 --ntasks-per-node=1 --overlap --cpus-per-task=64 --cpu-bind=none \
             /b/balsam-mpi-launcher --consume-all"
        );
        let mut local = alloc(SchedulerKind::Local, &["localhost"]);
        local.node_count = 2;
        assert_eq!(
            run(&local, MpiLauncherKind::Mpich, false),
            "mpiexec -n 3 /b/balsam-mpi-launcher --consume-all"
        );
        let site = MpiLauncherKind::Template("mpirun -np {{ num_ranks }} {{ command }}".into());
        assert_eq!(
            run(&pbs, site, false),
            "mpirun -np 3 /b/balsam-mpi-launcher --consume-all"
        );
    }

    fn spec() -> MpiLaunchSpec {
        MpiLaunchSpec {
            num_ranks: 128,
            ranks_per_node: 64,
            threads_per_rank: 2,
            threads_per_core: 1,
            cpu_affinity: CpuAffinity::Depth,
            nodes: vec!["nid01001".into(), "1002".into()],
            env: vec![
                ("OMP_NUM_THREADS".into(), "2".into()),
                ("BALSAM_JOB_ID".into(), "abc".into()),
            ],
            mpi_flags: vec!["--cc-test".into()],
            argv: vec!["/apps/run1.exe".into(), "arg 1".into()],
        }
    }

    /// Expected argv written as a shell line (so 'arg 1' stays one word).
    fn words(line: &str) -> Vec<String> {
        shell_words::split(line).unwrap()
    }

    #[test]
    fn aprun_command() {
        let a =
            build_mpi_command(&MpiLauncherKind::Aprun, &LaunchConfig::default(), &spec()).unwrap();
        assert_eq!(
            a,
            words(
                "aprun -n 128 -N 64 -d 2 -j 1 -cc depth -L 1001,1002 -e OMP_NUM_THREADS=2 \
                 -e BALSAM_JOB_ID=abc --cc-test /apps/run1.exe 'arg 1'"
            )
        );
        assert_eq!(aprun_nid("nid00012").unwrap(), "12");
        assert_eq!(aprun_nid("0").unwrap(), "0");
        let mut s = spec();
        s.nodes = vec!["login1".into()];
        let err = build_mpi_command(&MpiLauncherKind::Aprun, &LaunchConfig::default(), &s)
            .unwrap_err()
            .to_string();
        assert!(err.contains("login1") && err.contains("numeric"), "{err}");
    }

    #[test]
    fn mpich_command() {
        let mut s = spec();
        s.nodes = vec!["n1".into(), "n2".into()];
        let config = LaunchConfig {
            mpiexec_exe: "/opt/fixtures/mpiexec".into(),
            ..LaunchConfig::default()
        };
        let a = build_mpi_command(&MpiLauncherKind::Mpich, &config, &s).unwrap();
        assert_eq!(
            a,
            words(
                "/opt/fixtures/mpiexec -n 128 -ppn 64 -hosts n1,n2 -env OMP_NUM_THREADS 2 \
                 -env BALSAM_JOB_ID abc --cc-test /apps/run1.exe 'arg 1'"
            )
        );
        // No node list: let mpiexec place the ranks.
        s.nodes.clear();
        let a = build_mpi_command(&MpiLauncherKind::Mpich, &config, &s).unwrap();
        assert!(!a.contains(&"-hosts".to_string()));
    }

    #[test]
    fn srun_command() {
        let mut s = spec();
        s.nodes = vec!["n1".into(), "n2".into()];
        s.env.push(("LIST".into(), "a,b".into()));
        let a = build_mpi_command(&MpiLauncherKind::Srun, &LaunchConfig::default(), &s).unwrap();
        assert_eq!(
            a,
            words(
                "srun -n 128 --ntasks-per-node 64 --nodelist n1,n2 -N 2 --cpus-per-task 2 \
                 --export=ALL,OMP_NUM_THREADS=2,BALSAM_JOB_ID=abc --cc-test env LIST=a,b \
                 /apps/run1.exe 'arg 1'"
            )
        );
        s.nodes.clear();
        s.env.clear();
        s.threads_per_rank = 1;
        s.num_ranks = 3;
        s.ranks_per_node = 2;
        let a = build_mpi_command(&MpiLauncherKind::Srun, &LaunchConfig::default(), &s).unwrap();
        assert_eq!(
            a,
            words("srun -n 3 --ntasks-per-node 2 -N 2 --cc-test /apps/run1.exe 'arg 1'")
        );
    }

    #[test]
    fn template_command() {
        let t = "mpirun -np {{ num_ranks }} --map-by ppr:{{ ranks_per_node }}:node \
                 {% for k, v in env %}-x {{ k }}={{ v }} {% endfor %}--host {{ hosts }} \
                 {{ mpi_flags }} {{ command }}";
        let mut s = spec();
        s.nodes = vec!["n1".into(), "n2".into()];
        let a = build_mpi_command(
            &MpiLauncherKind::Template(t.into()),
            &LaunchConfig::default(),
            &s,
        )
        .unwrap();
        assert_eq!(
            a,
            vec![
                "mpirun",
                "-np",
                "128",
                "--map-by",
                "ppr:64:node",
                "-x",
                "OMP_NUM_THREADS=2",
                "-x",
                "BALSAM_JOB_ID=abc",
                "--host",
                "n1,n2",
                "--cc-test",
                "/apps/run1.exe",
                "arg 1"
            ]
        );
    }

    #[test]
    fn template_errors_name_the_problem() {
        let kind = MpiLauncherKind::Template("mpirun -n {{ num_rank }} {{ command }}".into());
        let err = build_mpi_command(&kind, &LaunchConfig::default(), &spec())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("MPI launch template") && err.contains("undefined"),
            "{err}"
        );
        let kind = MpiLauncherKind::Template("mpirun {% if %}".into());
        assert!(build_mpi_command(&kind, &LaunchConfig::default(), &spec()).is_err());
        let kind = MpiLauncherKind::Template("mpirun 'unclosed {{ command }}".into());
        assert!(build_mpi_command(&kind, &LaunchConfig::default(), &spec()).is_err());
    }

    #[test]
    fn bad_specs() {
        let mut s = spec();
        s.argv.clear();
        assert!(build_mpi_command(&MpiLauncherKind::Mpich, &LaunchConfig::default(), &s).is_err());
        let mut s = spec();
        s.ranks_per_node = 0;
        assert!(build_mpi_command(&MpiLauncherKind::Srun, &LaunchConfig::default(), &s).is_err());
        let mut s = spec();
        s.env.push(("A=B".into(), "x".into()));
        assert!(build_mpi_command(&MpiLauncherKind::Mpich, &LaunchConfig::default(), &s).is_err());
    }

    #[test]
    fn detect() {
        let env = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let theta = env(&[("COBALT_JOBID", "1"), ("COBALT_PARTNAME", "1-2")]);
        let cooley = env(&[("COBALT_JOBID", "1"), ("COBALT_NODEFILE", "/f")]);
        let slurm = env(&[("SLURM_JOB_ID", "1")]);
        let none = env(&[]);
        assert_eq!(
            MpiLauncherKind::detect(&theta, None).unwrap(),
            MpiLauncherKind::Aprun
        );
        assert_eq!(
            MpiLauncherKind::detect(&cooley, None).unwrap(),
            MpiLauncherKind::Mpich
        );
        assert_eq!(
            MpiLauncherKind::detect(&slurm, None).unwrap(),
            MpiLauncherKind::Srun
        );
        assert_eq!(
            MpiLauncherKind::detect(&none, None).unwrap(),
            MpiLauncherKind::Mpich
        );
        assert_eq!(
            MpiLauncherKind::detect(&slurm, Some("mpich")).unwrap(),
            MpiLauncherKind::Mpich
        );
        assert_eq!(
            MpiLauncherKind::detect(&theta, Some("  ")).unwrap(),
            MpiLauncherKind::Aprun
        );
        assert!(matches!(
            MpiLauncherKind::detect(&none, Some("mpirun -n {{ num_ranks }}")).unwrap(),
            MpiLauncherKind::Template(_)
        ));
        let err = MpiLauncherKind::detect(&none, Some("openmpi"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("openmpi") && err.contains("aprun"), "{err}");
    }

    #[test]
    fn affinity() {
        assert_eq!("depth".parse::<CpuAffinity>().unwrap(), CpuAffinity::Depth);
        assert_eq!("None".parse::<CpuAffinity>().unwrap(), CpuAffinity::None);
        assert!("cpu"
            .parse::<CpuAffinity>()
            .unwrap_err()
            .to_string()
            .contains("none, depth"));
    }
}
