//! The reference controller: `acpimon controller --listen ADDR --store DIR`.
