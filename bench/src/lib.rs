//! acpimon's benchmarks and the simulated VM they run on, kept out of the product binary:
//! [`latency`] measures trigger-to-record latency on the real test guest (`acpimon-bench
//! latency`), [`scale`] one `acpimon watch` over hundreds of [`simvm`] VMs (`acpimon-bench
//! scale`).

pub mod latency;
pub mod scale;
pub mod simvm;
