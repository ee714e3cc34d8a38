//! Knowledge-distillation losses: each a function of the student's and the
//! teacher's outputs on one batch, one file each, with the weight the
//! reference suites use (RepDistiller, torchdistill; see `shared/METHODS.md`).
