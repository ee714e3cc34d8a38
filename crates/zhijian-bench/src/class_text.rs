//! The second tower of a multimodal experiment (`[class_text]`): a frozen
//! text encoder embeds each class's description once, for the methods that
//! read class texts ([`zhijian_core::Method::reads_class_text`]).

use tch::{Device, Kind, Tensor};
use zhijian_backbones::BertConfig;
use zhijian_core::{Input, Method, Result, train};

use crate::build::{TextModel, build_model, tokenizer_file};
use crate::experiment::{BackboneConfig, ClassText, Experiment};

/// Longest description kept, in tokens: a class description is a phrase.
const MAX_TOKENS: usize = 128;

/// The class descriptions' embeddings, computed once per experiment.
pub struct ClassTexts {
    /// `[classes, d]`, fp32, on the CPU.
    pub embeddings: Tensor,
    /// One line for the log: the encoder and the descriptions.
    pub description: String,
}

impl ClassTexts {
    /// Embeds `config`'s descriptions of `classes` (the data set's names, in
    /// label order) with its text encoder's sentence embedding (the
    /// encoder's pooling: the mean over tokens for MiniLM), frozen, no gradient.
    pub fn embed(exp: &Experiment, config: &ClassText, classes: &[String], device: Device) -> Result<ClassTexts> {
        let descriptions = config.descriptions(classes)?;
        let text = Experiment { backbone: BackboneConfig::Bert { weights: config.weights.clone(), pooling: Default::default(), layers: None }, ..exp.clone() };
        let (model, desc) = build_model(&text, 2, device)?;
        let tokenizer_json = tokenizer_file(&text)?.expect("a bert backbone has a tokenizer");
        let tokens = zhijian_data::TextTokenizer::from_file(&tokenizer_json, MAX_TOKENS)?.encode(&descriptions)?;
        let input = Input::Tokens { ids: tokens.ids, mask: tokens.mask };
        let embeddings = train::features(&model, &[], &input, 64)?.to_device(Device::Cpu);
        let quoted: Vec<String> = descriptions.iter().map(|d| format!("\"{d}\"")).collect();
        Ok(ClassTexts { embeddings, description: format!("{desc}, {} descriptions: {}", descriptions.len(), quoted.join(", ")) })
    }

    /// Hands the embeddings to every method of `methods` that reads them.
    pub fn give(&self, methods: &mut [Box<dyn Method>]) -> Result<()> {
        methods.iter_mut().filter(|m| m.reads_class_text()).try_for_each(|m| m.set_class_text(&self.embeddings))
    }
}

/// Gives the methods of a run being restored that read class texts a
/// placeholder of the right shape, `[classes, d]` zeros with `d` the text
/// encoder's width from its `config.json`, so that `prepare` can size their
/// heads: the run's artifact then writes the embeddings it was trained with
/// over it. Nothing is tokenised or encoded.
pub fn for_restore(exp: &Experiment, classes: i64, methods: &mut [Box<dyn Method>]) -> Result<()> {
    if !methods.iter().any(|m| m.reads_class_text()) {
        return Ok(());
    }
    let config = exp.class_text.clone().unwrap_or_default();
    let width = BertConfig::from_json(&TextModel::resolve(&config.weights, &exp.base)?.file("config.json")?)?.hidden_size;
    let placeholder = Tensor::zeros([classes, width], (Kind::Float, Device::Cpu));
    methods.iter_mut().filter(|m| m.reads_class_text()).try_for_each(|m| m.set_class_text(&placeholder))
}
