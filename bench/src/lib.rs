//! acpimon's benchmarks and the simulated VM they run on, kept out of the product binary:
//! [`latency`] measures trigger-to-record latency on the real test guest (`acpimon-bench
//! latency`), [`scale`] one `acpimon watch` over hundreds of [`simvm`] VMs (`acpimon-bench
//! scale`), [`flood`] what guests flooding their consoles cost it (`acpimon-bench flood`),
//! [`faults`] the fault suite (`acpimon-bench faults`), [`hoststep`] the `host` diagnostic
//! step's time (`acpimon-bench host-step`), [`kernel_log`] the guest's kernel log read from
//! its memory beside a full dump (`acpimon-bench kernel-log`), [`guestcost`] what a heartbeat
//! costs the guest (`acpimon-bench guest-cost`), [`soak`] a heartbeat profile against a loaded
//! guest with staged hangs (`acpimon-bench soak`), [`store`] the controller store's page
//! queries with 100,000 events (`acpimon-bench store`).

pub mod faults;
pub mod flood;
pub mod guestcost;
pub mod hoststep;
pub mod kernel_log;
pub mod latency;
pub mod sampler;
pub mod scale;
pub mod simvm;
pub mod soak;
pub mod store;
