//! The small MLP and CNN: shapes, sites, groups, taps and bad configs.

use tch::{Device, Kind, Tensor};
use zhijian_backbones::{Mlp, MlpConfig, SmallCnn, SmallCnnConfig};
use zhijian_core::{Ctx, Input, Model, ParamGroup, Role, Tap};

#[test]
fn small_backbones_run_and_expose_their_layers() {
    let images = Input::Images(Tensor::randn([5, 3, 28, 28], (Kind::Float, Device::Cpu)));
    let mlp = Model::new(Device::Cpu, 10, |p| Box::new(Mlp::new(p, &MlpConfig::default()).unwrap()));
    let cx = Ctx::new(false, &[], vec![Tap::Block(0)]);
    assert_eq!(mlp.forward(&cx, &images).size(), [5, 10]);
    assert_eq!(cx.take_taps()[&Tap::Block(0)].size(), [5, 256]);
    let sites: Vec<(String, i64)> = mlp.sites().into_iter().map(|s| (s.path, s.in_features)).collect();
    assert_eq!(sites, [("layers.0".to_string(), 3 * 28 * 28), ("layers.1".into(), 256), ("head".into(), 128)]);
    assert_eq!(mlp.group("layers.1.bias"), ParamGroup::Block(1));

    let cnn = Model::new(Device::Cpu, 10, |p| Box::new(SmallCnn::new(p, &SmallCnnConfig::default()).unwrap()));
    let cx = Ctx::new(false, &[], vec![Tap::Block(1), Tap::Block(2)]);
    assert_eq!(cnn.forward(&cx, &images).size(), [5, 10]);
    let taps = cx.take_taps();
    // Two 2×2 max-pools: 28 → 14 → 7.
    assert_eq!((taps[&Tap::Block(1)].size(), taps[&Tap::Block(2)].size()), (vec![5, 64, 7, 7], vec![5, 128, 7, 7]));
    let roles: Vec<Role> = cnn.sites().iter().map(|s| s.role).collect();
    assert_eq!(roles, [Role::Stem, Role::Norm, Role::Spatial, Role::Norm, Role::Spatial, Role::Norm, Role::Head]);
    assert_eq!(cnn.group("features.2.bn.weight"), ParamGroup::Block(2));
    // 3·32·9 + 32·64·9 + 64·128·9 convolution weights, 2·(32+64+128) BatchNorm, 128·10+10 head.
    assert_eq!(cnn.num_params(), 864 + 18_432 + 73_728 + 448 + 1_290);

    let vs = tch::nn::VarStore::new(Device::Cpu);
    assert!(Mlp::new(vs.root(), &MlpConfig { hidden: vec![], ..MlpConfig::default() }).is_err());
    assert!(SmallCnn::new(vs.root(), &SmallCnnConfig { channels: vec![8, 0], ..SmallCnnConfig::default() }).is_err());
}
