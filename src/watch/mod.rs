//! `acpimon watch`: the node-side service.
