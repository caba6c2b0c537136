//! The container's seccomp profile on exec'd processes, as runc applies it.
//!
//! libcontainer's tenant builder (what [`crate::container::Container::exec`]
//! uses) gives the exec'd process a `linux` section of the namespaces, the
//! cgroup path, the personality and the time offsets only: the container's
//! `linux.seccomp` is dropped, and an exec'd process ran unfiltered, a
//! profile escaped by being exec'd (`kubectl exec`, `ctr task exec`,
//! `bulkhead exec`). libcontainer has no way to pass it in, so the filter is
//! installed by the executor instead, the last step before `execve` in the
//! new process, after its user and capabilities were set.
//!
//! Without no_new_privs, installing a filter needs CAP_SYS_ADMIN, which the
//! process may not keep. runc installs the filter before it drops
//! capabilities for that reason; here the process is set up with
//! CAP_SYS_ADMIN added to its effective and permitted sets, and the executor
//! drops it again right after the filter is in, before `execve`: the command
//! never runs with it. (So the profile must allow `capset`, as it must for
//! runc, which drops capabilities under the filter in that case too.)

use libcontainer::capabilities::drop_privileges;
use libcontainer::syscall::syscall::create_syscall;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use oci_spec::runtime::{
    Capabilities, Capability, LinuxCapabilities, LinuxSeccomp, LinuxSeccompAction,
    Process as OciProcess, Spec,
};

/// Runs an exec'd process's command under the container's seccomp filter.
#[derive(Clone)]
pub struct SeccompExecutor {
    profile: LinuxSeccomp,
    /// The capabilities the process asked for, when CAP_SYS_ADMIN was lent
    /// to it to install the filter.
    restore: Option<LinuxCapabilities>,
}

/// Why an exec cannot carry the container's profile.
#[derive(Debug, thiserror::Error)]
pub enum ExecSeccompError {
    /// A user-notification rule needs a listener, which only the
    /// container's first process is given.
    #[error(
        "the container's seccomp profile has SCMP_ACT_NOTIFY rules, which exec'd processes \
         cannot use (no listener is connected for them); use another action for exec"
    )]
    Notify,
}

impl SeccompExecutor {
    /// The executor for `process` (exec'd into a container whose profile is
    /// `profile`); lends `process` CAP_SYS_ADMIN where the filter needs it.
    pub fn prepare(
        process: &mut OciProcess,
        profile: &LinuxSeccomp,
    ) -> Result<SeccompExecutor, ExecSeccompError> {
        let notifies = |action: LinuxSeccompAction| action == LinuxSeccompAction::ScmpActNotify;
        if notifies(profile.default_action())
            || profile
                .syscalls()
                .iter()
                .flatten()
                .any(|s| notifies(s.action()))
        {
            return Err(ExecSeccompError::Notify);
        }
        let mut restore = None;
        if process.no_new_privileges() != Some(true) {
            if let Some(caps) = process.capabilities() {
                if let Some(lent) = with_sys_admin(caps) {
                    restore = Some(caps.clone());
                    process.set_capabilities(Some(lent));
                }
            }
        }
        Ok(SeccompExecutor {
            profile: profile.clone(),
            restore,
        })
    }

    /// Whether CAP_SYS_ADMIN was lent to the process.
    pub fn lends_sys_admin(&self) -> bool {
        self.restore.is_some()
    }
}

/// `caps` with CAP_SYS_ADMIN in its effective and permitted sets, or `None`
/// when it has it there already. A set left out keeps what the process had,
/// which for the agent's root is everything.
fn with_sys_admin(caps: &LinuxCapabilities) -> Option<LinuxCapabilities> {
    let lacks = |set: &Option<Capabilities>| {
        set.as_ref()
            .is_some_and(|s| !s.contains(&Capability::SysAdmin))
    };
    if !lacks(caps.effective()) && !lacks(caps.permitted()) {
        return None;
    }
    let add = |set: &Option<Capabilities>| {
        set.clone().map(|mut s| {
            s.insert(Capability::SysAdmin);
            s
        })
    };
    let mut lent = caps.clone();
    lent.set_effective(add(caps.effective()))
        .set_permitted(add(caps.permitted()));
    Some(lent)
}

impl Executor for SeccompExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        let notify = libcontainer::seccomp::initialize_seccomp(&self.profile).map_err(|e| {
            ExecutorError::Other(format!("installing the container's seccomp filter: {e}"))
        })?;
        if notify.is_some() {
            // prepare() refused such profiles; never run the command with a
            // filter that would block it on a listener nobody holds.
            return Err(ExecutorError::Other(ExecSeccompError::Notify.to_string()));
        }
        if let Some(caps) = &self.restore {
            drop_privileges(caps, create_syscall().as_ref()).map_err(|e| {
                ExecutorError::Other(format!(
                    "dropping CAP_SYS_ADMIN again after the seccomp filter: {e}"
                ))
            })?;
        }
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{
        LinuxCapabilitiesBuilder, LinuxSeccompBuilder, LinuxSyscallBuilder, ProcessBuilder,
    };

    fn profile(action: LinuxSeccompAction) -> LinuxSeccomp {
        LinuxSeccompBuilder::default()
            .default_action(LinuxSeccompAction::ScmpActAllow)
            .syscalls(vec![LinuxSyscallBuilder::default()
                .names(vec!["chmod".to_string()])
                .action(action)
                .build()
                .unwrap()])
            .build()
            .unwrap()
    }

    fn process(nnp: Option<bool>, caps: Option<&[Capability]>) -> OciProcess {
        let mut p = ProcessBuilder::default()
            .args(vec!["true".to_string()])
            .build()
            .unwrap();
        p.set_no_new_privileges(nnp);
        p.set_capabilities(caps.map(|c| {
            let set: Capabilities = c.iter().copied().collect();
            LinuxCapabilitiesBuilder::default()
                .bounding(set.clone())
                .effective(set.clone())
                .permitted(set.clone())
                .inheritable(set.clone())
                .ambient(set)
                .build()
                .unwrap()
        }));
        p
    }

    fn set(p: &OciProcess, which: fn(&LinuxCapabilities) -> &Option<Capabilities>) -> Capabilities {
        which(p.capabilities().as_ref().unwrap()).clone().unwrap()
    }

    #[test]
    fn without_no_new_privs_sys_admin_is_lent_for_the_filter_only() {
        let mut p = process(Some(false), Some(&[Capability::Kill]));
        let original = p.capabilities().clone().unwrap();
        let exec =
            SeccompExecutor::prepare(&mut p, &profile(LinuxSeccompAction::ScmpActErrno)).unwrap();
        assert!(exec.lends_sys_admin());
        for which in [LinuxCapabilities::effective, LinuxCapabilities::permitted] {
            assert!(set(&p, which).contains(&Capability::SysAdmin));
        }
        // Never where it would outlive execve.
        for which in [
            LinuxCapabilities::bounding,
            LinuxCapabilities::inheritable,
            LinuxCapabilities::ambient,
        ] {
            assert!(!set(&p, which).contains(&Capability::SysAdmin));
        }
        assert_eq!(exec.restore, Some(original));
    }

    #[test]
    fn nothing_is_lent_when_not_needed() {
        let profile = profile(LinuxSeccompAction::ScmpActErrno);
        // no_new_privs lets an unprivileged process install a filter.
        let mut p = process(Some(true), Some(&[Capability::Kill]));
        assert!(!SeccompExecutor::prepare(&mut p, &profile)
            .unwrap()
            .lends_sys_admin());
        assert!(!set(&p, LinuxCapabilities::effective).contains(&Capability::SysAdmin));
        // A process that keeps CAP_SYS_ADMIN, or all of root's capabilities.
        let mut p = process(None, Some(&[Capability::SysAdmin]));
        assert!(!SeccompExecutor::prepare(&mut p, &profile)
            .unwrap()
            .lends_sys_admin());
        let mut p = process(None, None);
        assert!(!SeccompExecutor::prepare(&mut p, &profile)
            .unwrap()
            .lends_sys_admin());
    }

    #[test]
    fn a_notify_profile_is_refused() {
        let mut p = process(Some(true), None);
        assert!(matches!(
            SeccompExecutor::prepare(&mut p, &profile(LinuxSeccompAction::ScmpActNotify)),
            Err(ExecSeccompError::Notify)
        ));
    }
}
