//! Pre-trained backbones written with zhijian's hookable layers, one file per
//! family, parameter names equal to the upstream checkpoint keys.

pub mod bert;
pub mod efficientnet;
pub mod pretrained;
pub mod resnet;
pub mod small;
pub mod toys;
pub mod vit;

pub use bert::{Bert, BertConfig, Family, MPNET_BUCKETS, Pooling, SUPPORTED_MODEL_TYPES, mpnet_relative_buckets};
pub use efficientnet::{EfficientNetLite, EfficientNetLiteConfig};
pub use pretrained::load_pretrained;
pub use resnet::{BlockKind, ResNet, ResNetConfig};
pub use small::{Mlp, MlpConfig, SmallCnn, SmallCnnConfig};
pub use vit::{Vit, VitConfig, VitPooling};
