//! The package's `DEBIAN/` folder: control, conffiles and the maintainer
//! script, and the runtime dependencies they declare.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use object::read::elf::{Dyn, ElfFile64, FileHeader, SectionHeader};
use object::{elf, Endianness};

/// The package's version: the workspace's.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `usr/share/doc/bulkhead/copyright`, which Debian policy asks every
/// package to carry.
pub const COPYRIGHT: &str = "\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: bulkhead

Files: *
Copyright: the bulkhead authors
License: Apache-2.0
 On Debian systems, the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.

Files: usr/libexec/bulkhead/virtiofsd
Copyright: the virtiofsd authors
License: Apache-2.0 and BSD-3-Clause
";

/// The Debian packages that provide the shared libraries an ELF binary of
/// the package needs. Only virtiofsd is dynamic; a library missing here is
/// an error, so a new dependency is declared rather than discovered on a
/// user's machine.
const LIBRARY_PACKAGES: &[(&str, &str)] = &[
    ("libc.so.6", "libc6"),
    ("libm.so.6", "libc6"),
    ("ld-linux-x86-64.so.2", "libc6"),
    ("libgcc_s.so.1", "libgcc-s1"),
    ("libcap-ng.so.0", "libcap-ng0"),
    ("libseccomp.so.2", "libseccomp2"),
];

/// The static binaries still load glibc's name-service modules at run time,
/// which must come from the glibc they were linked with: Debian 12's.
const GLIBC: &str = "libc6 (>= 2.36)";

/// What `bulkhead run`'s default network runs: the standard CNI plugins,
/// iptables for portmap and the networks' host rules, and nft for
/// egress policies.
const NETWORK_DEPENDS: &[&str] = &["containernetworking-plugins", "iptables", "nftables"];

/// The `Depends` of the package: glibc, the network's tools, plus the package of every library
/// `dynamic` (virtiofsd) is linked against.
pub fn depends_of(dynamic: &Path) -> Result<Vec<String>> {
    let mut depends = vec![GLIBC.to_owned()];
    depends.extend(NETWORK_DEPENDS.iter().map(|d| (*d).to_owned()));
    for soname in needed_libraries(dynamic)? {
        let Some((_, package)) = LIBRARY_PACKAGES.iter().find(|(lib, _)| *lib == soname) else {
            bail!(
                "{} needs {soname}, which the package does not declare: add its Debian \
                 package to LIBRARY_PACKAGES in xtask/src/package/control.rs",
                dynamic.display()
            );
        };
        if !depends.iter().any(|d| d.split(' ').next() == Some(package)) {
            depends.push((*package).to_owned());
        }
    }
    Ok(depends)
}

/// The `DT_NEEDED` entries of an ELF executable.
fn needed_libraries(path: &Path) -> Result<Vec<String>> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = ElfFile64::<Endianness>::parse(&*data)
        .with_context(|| format!("{} is not a 64-bit ELF file", path.display()))?;
    let (header, endian) = (file.elf_header(), file.endian());
    let sections = header.sections(endian, &*data)?;
    let mut needed = Vec::new();
    for (index, section) in sections.iter().enumerate() {
        let Some((entries, strings_index)) = section.dynamic(endian, &*data)? else {
            continue;
        };
        let strings = sections.strings(endian, &*data, strings_index)?;
        for entry in entries {
            if entry.d_tag(endian) == elf::DT_NEEDED {
                let name = entry.string(endian, strings).with_context(|| {
                    format!("bad DT_NEEDED in section {index} of {}", path.display())
                })?;
                needed.push(String::from_utf8_lossy(name).into_owned());
            }
        }
    }
    Ok(needed)
}

/// The maintainer script run after unpacking: loads the embedded busybox
/// image into the store, so `bulkhead run busybox echo hi` works at once
/// with no registry. A failure there is a warning, not a failed install.
const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = configure ]; then
    image=/usr/share/bulkhead/images/busybox.tar
    if ! out=$(/usr/bin/bulkhead load --input "$image" 2>&1); then
        printf '%s\n' "$out" >&2
        echo "bulkhead: warning: the busybox image was not loaded; run: bulkhead load -i $image" >&2
    fi
fi
exit 0
"#;

/// Writes `stage/DEBIAN/` for the staged tree: `control` (with
/// `depends`), `conffiles` (the staged paths in `conffiles`) and `postinst`.
pub fn write_debian_dir(stage: &Path, depends: &[String], conffiles: &[&str]) -> Result<()> {
    let debian = stage.join("DEBIAN");
    fs::create_dir_all(&debian)?;
    let control = format!(
        "Package: bulkhead\n\
         Version: {VERSION}\n\
         Architecture: amd64\n\
         Maintainer: bulkhead developers <bulkhead@localhost>\n\
         Installed-Size: {}\n\
         Depends: {}\n\
         Suggests: containerd\n\
         Section: admin\n\
         Priority: optional\n\
         Description: containers in lightweight KVM microVMs\n \
         bulkhead runs each container (or Kubernetes pod) in its own microVM with\n \
         a minimal guest kernel, so that code escaping its container lands in a\n \
         throw-away guest kernel, not on the host. It ships the `bulkhead` CLI\n \
         (docker-like, no daemon), the containerd shim `io.containerd.bulkhead.v2`\n \
         (Kubernetes RuntimeClass, nerdctl, Docker 23+), `bulkhead-runtime` with\n \
         runc's command line (podman, Docker 20.10), its own VMM, the guest\n \
         kernel and agent, and a busybox image. Needs /dev/kvm.\n",
        installed_size_kib(stage)?,
        depends.join(", ")
    );
    fs::write(debian.join("control"), control)?;
    let conffiles: String = conffiles.iter().map(|c| format!("/{c}\n")).collect();
    fs::write(debian.join("conffiles"), conffiles)?;
    let postinst = debian.join("postinst");
    fs::write(&postinst, POSTINST)?;
    fs::set_permissions(&postinst, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The staged files' total size in KiB, as `Installed-Size` wants it.
fn installed_size_kib(dir: &Path) -> Result<u64> {
    let mut bytes = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        bytes += if meta.is_dir() {
            installed_size_kib(&entry.path())? * 1024
        } else {
            meta.len()
        };
    }
    Ok(bytes.div_ceil(1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_binary_gets_its_libraries_packages() {
        // This test binary is dynamic: it needs glibc (and libgcc's unwinder).
        let exe = std::env::current_exe().unwrap();
        let needed = needed_libraries(&exe).unwrap();
        assert!(needed.iter().any(|n| n == "libc.so.6"), "{needed:?}");
        let depends = depends_of(&exe).unwrap();
        assert_eq!(depends[0], GLIBC);
        assert_eq!(
            depends.iter().filter(|d| d.starts_with("libc6")).count(),
            1,
            "{depends:?}"
        );
    }

    #[test]
    fn a_file_that_is_not_elf_is_an_error_naming_it() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), b"#!/bin/sh\n").unwrap();
        let err = depends_of(file.path()).unwrap_err();
        assert!(
            format!("{err:#}").contains(&file.path().display().to_string()),
            "{err:#}"
        );
    }

    #[test]
    fn control_names_the_dependencies_and_conffiles() {
        let stage = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(stage.path().join("etc/bulkhead")).unwrap();
        std::fs::write(stage.path().join("etc/bulkhead/config.toml"), [0u8; 3000]).unwrap();
        write_debian_dir(
            stage.path(),
            &["libc6 (>= 2.36)".into(), "libcap-ng0".into()],
            &["etc/bulkhead/config.toml"],
        )
        .unwrap();
        let control = std::fs::read_to_string(stage.path().join("DEBIAN/control")).unwrap();
        assert!(
            control.contains("\nDepends: libc6 (>= 2.36), libcap-ng0\n"),
            "{control}"
        );
        assert!(control.contains("\nInstalled-Size: 3\n"), "{control}");
        assert!(control.ends_with(".\n") && !control.contains("\n\n"));
        let conffiles = std::fs::read_to_string(stage.path().join("DEBIAN/conffiles")).unwrap();
        assert_eq!(conffiles, "/etc/bulkhead/config.toml\n");
    }
}
