//! Loaded modules' symbols, from their own symbol tables in guest memory: the kernel's
//! `modules` list links each `struct module`, whose `name` and `kallsyms` (a `struct
//! mod_kallsyms`: `symtab`, `num_symtab`, `strtab`, ELF symbols with relocated addresses) are
//! what /proc/kallsyms shows for modules. VMCOREINFO does not describe `struct module`, whose
//! layout changes with the kernel's version and configuration: the offsets come from the
//! kernel's own BTF (`CONFIG_DEBUG_INFO_BTF`, Debian's kernels have it), found between
//! `__start_BTF` and `__stop_BTF` in the kernel's kallsyms.
//!
//! Guest-written throughout: the BTF walk visits each type once within its stated length, the
//! list walk stops after [`MAX_MODULES`] or at a pointer seen before, every table is capped.

use std::collections::BTreeSet;

use super::kallsyms::KernelSymbol;
use super::translate::KernelMap;
use super::{le_u16, le_u32, le_u64, PhysRead};
use crate::verdict::symbols::SymbolEntry;

/// The most modules walked (a busy host kernel has a few hundred).
pub const MAX_MODULES: usize = 1024;
/// The largest BTF read (Debian's 6.12: about 5 MiB).
const MAX_BTF: u64 = 16 << 20;
/// The most ELF symbols of one module (the largest modules have tens of thousands).
const MAX_MODULE_SYMS: u64 = 1 << 17;
/// The largest string table of one module read.
const MAX_STRTAB: u64 = 4 << 20;
/// `MODULE_NAME_LEN` on 64-bit.
const MODULE_NAME_LEN: usize = 56;
const BTF_MAGIC: u16 = 0xeb9f;
const BTF_STRUCT: u32 = 4;

/// Where `struct module`'s and `struct mod_kallsyms`' fields are, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModuleLayout {
    pub list: u64,
    pub name: u64,
    pub kallsyms: u64,
    pub symtab: u64,
    pub num_symtab: u64,
    pub strtab: u64,
}

/// The fields of `struct module` and `struct mod_kallsyms` in a BTF blob.
pub fn btf_layout(btf: &[u8]) -> Result<ModuleLayout, String> {
    let bad = |what: &str| format!("the kernel's BTF is unusable: {what}");
    if le_u16(btf, 0) != Some(BTF_MAGIC) {
        return Err(bad("no BTF magic"));
    }
    let field = |at: usize| le_u32(btf, at).map(|v| v as usize).ok_or_else(|| bad("truncated header"));
    let hdr_len = field(4)?;
    let (type_off, type_len, str_off, str_len) = (field(8)?, field(12)?, field(16)?, field(20)?);
    let types_at = hdr_len.checked_add(type_off).ok_or_else(|| bad("type section"))?;
    let types = btf.get(types_at..types_at.saturating_add(type_len)).ok_or_else(|| bad("type section"))?;
    let strs_at = hdr_len.checked_add(str_off).ok_or_else(|| bad("string section"))?;
    let strs = btf.get(strs_at..strs_at.saturating_add(str_len)).ok_or_else(|| bad("string section"))?;
    let name = |off: u32| -> &[u8] {
        let rest = strs.get(off as usize..).unwrap_or_default();
        rest.split(|&b| b == 0).next().unwrap_or_default()
    };
    // (struct name, member name) -> byte offset, for the two structs wanted.
    let mut module: Option<Vec<(Vec<u8>, u64)>> = None;
    let mut kallsyms: Option<Vec<(Vec<u8>, u64)>> = None;
    let mut at = 0usize;
    // Every type is at least 12 bytes: this ends.
    while at + 12 <= types.len() && (module.is_none() || kallsyms.is_none()) {
        let name_off = le_u32(types, at).unwrap_or(0);
        let info = le_u32(types, at + 4).unwrap_or(0);
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kind_flag = info >> 31 == 1;
        let extra = match kind {
            1 | 14 | 17 => 4,
            3 => 12,
            4 | 5 | 15 | 19 => 12 * vlen,
            6 | 13 => 8 * vlen,
            2 | 7..=12 | 16 | 18 => 0,
            k => return Err(bad(&format!("unknown type kind {k}"))),
        };
        let members_at = at + 12;
        if kind == BTF_STRUCT {
            let wanted = match name(name_off) {
                b"module" if module.is_none() => Some(&mut module),
                b"mod_kallsyms" if kallsyms.is_none() => Some(&mut kallsyms),
                _ => None,
            };
            if let Some(slot) = wanted {
                let mut members = Vec::with_capacity(vlen);
                for i in 0..vlen {
                    let m = members_at + 12 * i;
                    let (Some(n), Some(off)) = (le_u32(types, m), le_u32(types, m + 8)) else { break };
                    let bits = if kind_flag { off & 0xff_ffff } else { off };
                    members.push((name(n).to_vec(), u64::from(bits / 8)));
                }
                *slot = Some(members);
            }
        }
        at = members_at.saturating_add(extra);
    }
    let find = |members: &Option<Vec<(Vec<u8>, u64)>>, st: &str, m: &str| {
        members
            .as_ref()
            .and_then(|ms| ms.iter().find(|(n, _)| n == m.as_bytes()).map(|&(_, o)| o))
            .ok_or_else(|| bad(&format!("no struct {st} with a member {m}")))
    };
    Ok(ModuleLayout {
        list: find(&module, "module", "list")?,
        name: find(&module, "module", "name")?,
        kallsyms: find(&module, "module", "kallsyms")?,
        symtab: find(&kallsyms, "mod_kallsyms", "symtab")?,
        num_symtab: find(&kallsyms, "mod_kallsyms", "num_symtab")?,
        strtab: find(&kallsyms, "mod_kallsyms", "strtab")?,
    })
}

/// The function symbols of every loaded module, within `mem`'s budget. `kernel` is the
/// kernel's own kallsyms (for `modules`, `__start_BTF` and `__stop_BTF`). A module that
/// cannot be read is left out; no module list or no BTF is an error (a message).
pub async fn read_module_symbols<M: PhysRead>(
    mem: &mut M,
    map: &KernelMap,
    kernel: &[KernelSymbol],
) -> Result<(Vec<SymbolEntry>, usize), String> {
    let addr = |n: &str| kernel.iter().find(|s| s.name == n).map(|s| s.addr);
    let (Some(start), Some(stop)) = (addr("__start_BTF"), addr("__stop_BTF")) else {
        return Err("the kernel has no BTF (CONFIG_DEBUG_INFO_BTF) to find struct module's layout by".into());
    };
    let head = addr("modules").ok_or("the kernel's kallsyms have no `modules` list")?;
    let len = stop
        .checked_sub(start)
        .filter(|&l| l > 24 && l <= MAX_BTF)
        .ok_or("the kernel's BTF size is implausible")?;
    let btf = map
        .read_virt(mem, start, len as usize)
        .await
        .map_err(|e| format!("reading the kernel's BTF: {e}"))?;
    let l = btf_layout(&btf)?;
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    let mut next = map.read_u64(mem, head).await.map_err(|e| format!("reading the module list: {e}"))?;
    let mut modules = 0;
    while next != head && seen.len() < MAX_MODULES && seen.insert(next) {
        let Some(module) = next.checked_sub(l.list) else { break };
        match read_module(mem, map, &l, module).await {
            Ok(syms) => {
                modules += 1;
                out.extend(syms);
            }
            Err(e) => tracing::debug!("module at {module:#x} left out: {e}"),
        }
        next = match map.read_u64(mem, next).await {
            Ok(n) => n,
            Err(_) => break,
        };
    }
    Ok((out, modules))
}

/// One module's function symbols.
async fn read_module<M: PhysRead>(
    mem: &mut M,
    map: &KernelMap,
    l: &ModuleLayout,
    module: u64,
) -> Result<Vec<SymbolEntry>, super::MemError> {
    let corrupt = |what: &str| super::MemError::Corrupt(format!("module {module:#x}: {what}"));
    let raw = map.read_virt(mem, module.wrapping_add(l.name), MODULE_NAME_LEN).await?;
    let name: String =
        raw.split(|&b| b == 0).next().unwrap_or_default().iter().map(|&b| char::from(b)).collect();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(corrupt("no readable name"));
    }
    let ks = map.read_u64(mem, module.wrapping_add(l.kallsyms)).await?;
    let symtab = map.read_u64(mem, ks.wrapping_add(l.symtab)).await?;
    let num = map.read_virt(mem, ks.wrapping_add(l.num_symtab), 4).await?;
    let num = u64::from(le_u32(&num, 0).unwrap_or(0));
    let strtab = map.read_u64(mem, ks.wrapping_add(l.strtab)).await?;
    if num == 0 || num > MAX_MODULE_SYMS {
        return Err(corrupt("implausible symbol count"));
    }
    let table = map.read_virt(mem, symtab, (num * 24) as usize).await?;
    // Elf64_Sym: st_name u32, st_info u8, st_other u8, st_shndx u16, st_value u64, st_size u64.
    let funcs: Vec<(u32, u8, u64, u64)> = table
        .chunks_exact(24)
        .filter_map(|s| {
            let (st_name, info, shndx) = (le_u32(s, 0)?, s[4], le_u16(s, 6)?);
            let (value, size) = (le_u64(s, 8)?, le_u64(s, 16)?);
            (info & 0xf == 2 && shndx != 0 && value != 0).then_some((st_name, info, value, size))
        })
        .collect();
    let Some(longest) = funcs.iter().map(|f| u64::from(f.0)).max() else { return Ok(Vec::new()) };
    let str_len = (longest + 512).min(MAX_STRTAB);
    let strs = map.read_virt(mem, strtab, str_len as usize).await?;
    let mut out = Vec::with_capacity(funcs.len());
    for (st_name, info, value, size) in funcs {
        let rest = strs.get(st_name as usize..).unwrap_or_default();
        let n = rest.split(|&b| b == 0).next().unwrap_or_default();
        if n.is_empty() || n.len() > 512 {
            continue;
        }
        out.push(SymbolEntry {
            addr: value,
            size: size.min(1 << 20),
            kind: if info >> 4 == 1 { 'T' } else { 't' },
            name: String::from_utf8_lossy(n).into_owned(),
            module: Some(name.clone()),
        });
    }
    Ok(out)
}
