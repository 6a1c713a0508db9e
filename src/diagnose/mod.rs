//! Diagnostics: when a VM becomes unresponsive or panics, an ordered list of steps gathers
//! evidence into a bundle directory with a `manifest.json`.
