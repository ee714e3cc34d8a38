//! Loads an experiment's data: train / validation / test splits, and the
//! out-of-distribution splits every strategy is also tested on.

use zhijian_core::{Error, ImagePreset, Result, Split};
use zhijian_data::image::{FASHION_MNIST_CLASSES, idx_dataset, mnist_json_digits, optdigits};
use zhijian_data::{Corruption, ImageLoader, ImageTransform, SUBSET_STREAM, image_folder, of_classes, per_class, stratified_split, subsample_stratified};

use crate::build::{asset, tokenizer_file};
use crate::experiment::{DataConfig, Experiment, ImageTask};

/// The loaded splits of an experiment.
pub struct Data {
    /// Training split.
    pub train: Split,
    /// Validation split.
    pub val: Split,
    /// In-distribution test split.
    pub test: Split,
    /// Out-of-distribution test splits, in the experiment's order.
    pub ood: Vec<Split>,
    /// Class names, by label index.
    pub classes: Vec<String>,
}

impl Data {
    /// `name (k classes; train … / val … / test … / <shift> …)`.
    pub fn describe(&self, name: &str) -> String {
        let shifted: String = self.ood.iter().map(|s| format!(" / {} {}", s.name, s.len())).collect();
        let (k, train, val, test) = (self.classes.len(), self.train.len(), self.val.len(), self.test.len());
        format!("{name} ({k} classes; train {train} / val {val} / test {test}{shifted})")
    }
}

/// Loads the experiment's data: text tokenised for its backbone, images
/// transformed as its `preset` says. `full` lifts the train and test limits.
pub fn load_data(exp: &Experiment, preset: Option<&ImagePreset>, full: bool) -> Result<Data> {
    match &exp.data {
        DataConfig::RottenTomatoes { max_len, fractions, split_seed, train_limit } => {
            let Some(tokenizer_json) = tokenizer_file(exp)? else {
                return Err(Error::Config("data `rotten_tomatoes` is text: it needs a `bert` backbone (its tokenizer)".into()));
            };
            let dataset = zhijian_data::rotten_tomatoes(&asset("rotten-tomatoes", "rotten_tomatoes_corpus_full.csv.bz2")?)?;
            let task = text_task(*fractions, *split_seed, *train_limit, None, full);
            let s = task.build(&dataset, &tokenizer(&tokenizer_json, *max_len)?)?;
            Ok(Data { train: s.train, val: s.val, test: s.test, ood: s.ood, classes: s.classes })
        }
        DataConfig::Text(files) => {
            let Some(tokenizer_json) = tokenizer_file(exp)? else {
                return Err(Error::Config("data `text` needs a `bert` backbone (its tokenizer)".into()));
            };
            let corpus = files.load(&|path| locate(path, &exp.base))?;
            let task = text_task([0.8, 0.1, 0.1], files.split_seed, files.train_limit, files.eval_limit, full);
            let s = task.build_corpus(&corpus, &tokenizer(&tokenizer_json, files.max_len)?)?;
            Ok(Data { train: s.train, val: s.val, test: s.test, ood: s.ood, classes: s.classes })
        }
        DataConfig::FashionMnist(task) => {
            let transform = transform(exp, task, preset)?;
            let file = |f: &str| asset("fashion-mnist", f);
            let classes: Vec<String> = FASHION_MNIST_CLASSES.map(String::from).to_vec();
            let train = idx_dataset(&file("train-images-idx3-ubyte.gz")?, &file("train-labels-idx1-ubyte.gz")?, classes.clone())?;
            let test = idx_dataset(&file("t10k-images-idx3-ubyte.gz")?, &file("t10k-labels-idx1-ubyte.gz")?, classes)?;
            let pool = ImageLoader::from_dataset(&train, transform.clone())?;
            image_splits(task, pool, Some(ImageLoader::from_dataset(&test, transform)?), &no_real_shift, full)
        }
        DataConfig::Mnist(task) => {
            let transform = transform(exp, task, preset)?;
            let digits = asset("mnist-digits", "0.json")?;
            let pool = ImageLoader::from_dataset(&mnist_json_digits(digits.parent().expect("a file has a folder"))?, transform.clone())?;
            let real = |name: &str| -> Result<Option<ImageLoader>> {
                match name {
                    "optdigits" => Ok(Some(ImageLoader::from_dataset(&optdigits(&asset("optdigits", "digits.csv.gz")?)?, transform.clone())?)),
                    _ => Ok(None),
                }
            };
            image_splits(task, pool, None, &real, full)
        }
        DataConfig::Optdigits(task) => {
            let pool = ImageLoader::from_dataset(&optdigits(&asset("optdigits", "digits.csv.gz")?)?, transform(exp, task, preset)?)?;
            image_splits(task, pool, None, &no_real_shift, full)
        }
        DataConfig::ImageFolder { path, task } => {
            let files = image_folder(&exp.base.join(path))?;
            image_splits(task, ImageLoader::from_files(&files, transform(exp, task, preset)?)?, None, &no_real_shift, full)
        }
    }
}

/// A data file of the experiment: `asset:NAME/FILE` is a file of a fetched
/// asset (the error says how to fetch it), anything else is relative to the
/// experiment file.
fn locate(path: &std::path::Path, base: &std::path::Path) -> Result<std::path::PathBuf> {
    match path.to_str().and_then(|p| p.strip_prefix("asset:")) {
        Some(spec) => {
            let (name, file) = spec.split_once('/').ok_or_else(|| Error::Config(format!("data path `{}` must be `asset:NAME/FILE`", path.display())))?;
            asset(name, file)
        }
        None => Ok(base.join(path)),
    }
}

/// The backbone's tokenizer (its `tokenizer.json`), truncating to `max_len`.
fn tokenizer(tokenizer_json: &std::path::Path, max_len: usize) -> Result<zhijian_data::TextTokenizer> {
    zhijian_data::TextTokenizer::from_file(tokenizer_json, max_len)
}

/// How a text task is cut, its tokens cached under the asset cache; `full` lifts the limits.
fn text_task(fractions: [f64; 3], seed: u64, train_limit: Option<usize>, eval_limit: Option<usize>, full: bool) -> zhijian_data::TextTask {
    let lift = |limit: Option<usize>| limit.filter(|_| !full);
    zhijian_data::TextTask {
        fractions,
        seed,
        train_limit: lift(train_limit),
        eval_limit: lift(eval_limit),
        cache_dir: Some(zhijian_assets::cache_dir().join("tokenized")),
    }
}

fn no_real_shift(_: &str) -> Result<Option<ImageLoader>> {
    Ok(None)
}

/// The backbone's preprocessing at the task's size, with the task's augmentation.
fn transform(exp: &Experiment, task: &ImageTask, preset: Option<&ImagePreset>) -> Result<ImageTransform> {
    let preset = preset.ok_or_else(|| Error::Config(format!("data `{}` is images, but the backbone does not take images", exp.data.name())))?;
    let mut t = ImageTransform::from_preset(preset);
    if let Some(size) = task.image_size {
        t.size = size;
    }
    if let Some(augment) = &task.augment {
        t.train = augment.clone();
    }
    t.validate()?;
    Ok(t)
}

/// Splits `pool` (its test part too, unless the data set has its own `test`),
/// keeps the classes the task names (`train_classes` for training and
/// validation, `eval_classes` for the test splits), draws `shots` per class,
/// applies the limits and builds the shifted test splits: a corruption of the
/// test images (`family:severity`) or a real shift `real(name)` knows.
fn image_splits(
    task: &ImageTask,
    pool: ImageLoader,
    test: Option<ImageLoader>,
    real: &dyn Fn(&str) -> Result<Option<ImageLoader>>,
    full: bool,
) -> Result<Data> {
    let [val_fraction, test_fraction] = task.holdout.unwrap_or([0.1, 0.1]);
    let own_test = if test.is_some() { 0.0 } else { test_fraction };
    let labels = pool.labels();
    let classes = pool.classes().len() as i64;
    for (field, wanted) in [("train_classes", &task.train_classes), ("eval_classes", &task.eval_classes)] {
        if let Some(bad) = wanted.iter().find(|&&c| !(0..classes).contains(&c)) {
            return Err(Error::Config(format!("data.{field}: class {bad} is not one of the data set's {classes} (0 … {})", classes - 1)));
        }
    }
    let parts = stratified_split(&labels, [1.0 - val_fraction - own_test, val_fraction, own_test], task.split_seed)?;
    let limited = |rows: Vec<usize>, labels: &[i64], limit: Option<usize>| match limit.filter(|_| !full) {
        Some(n) => subsample_stratified(&rows, labels, n, task.split_seed ^ SUBSET_STREAM),
        None => rows,
    };
    // Shots are the task itself, not a budget: `full` keeps them.
    let train = of_classes(parts.train, &labels, &task.train_classes);
    let train = match task.shots {
        Some(k) => per_class(&train, &labels, k, task.split_seed ^ SUBSET_STREAM),
        None => train,
    };
    let train = limited(train, &labels, task.train_limit);
    let evaluated = |rows: Vec<usize>, labels: &[i64]| limited(of_classes(rows, labels, &task.eval_classes), labels, task.eval_limit);
    let (test, test_rows) = match test {
        Some(t) => {
            let l = t.labels();
            let rows = evaluated((0..l.len()).collect(), &l);
            (t, rows)
        }
        None => {
            let rows = evaluated(parts.test, &labels);
            (pool.clone(), rows)
        }
    };
    let mut ood = Vec::new();
    for name in &task.ood {
        let split = if let Some(shifted) = real(name)? {
            let l = shifted.labels();
            shifted.split(name, &evaluated((0..l.len()).collect(), &l))?
        } else {
            let corruption: Corruption =
                name.parse().map_err(|e: Error| Error::Config(format!("ood `{name}` is neither a shift this data set has nor a corruption: {e}")))?;
            test.clone().with_corruption(corruption, task.split_seed).split(name, &test_rows)?
        };
        ood.push(split);
    }
    Ok(Data {
        train: pool.split("train", &train)?,
        val: pool.split("val", &limited(of_classes(parts.val, &labels, &task.train_classes), &labels, task.eval_limit))?,
        test: test.split("test", &test_rows)?,
        ood,
        classes: pool.classes().to_vec(),
    })
}
