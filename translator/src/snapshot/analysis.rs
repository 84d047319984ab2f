//! Istio's analyzers, as warnings: references to unknown hosts and subsets (IST0101), per
//! VirtualService and DestinationRule so an update re-checks only what it may have changed.

use super::{DestinationRuleSpec, Snapshot, VirtualServiceSpec, resolve_host};
use crate::diagnostic::{Diagnostic, ObjectRef, Severity};
use crate::model::IstioObject;
use crate::model::virtual_service::Destination;

fn warning(origin: &str, object: &ObjectRef, path: String, message: String) -> Diagnostic {
    Diagnostic {
        severity: Severity::Warning,
        origin: origin.to_string(),
        object: Some(object.clone()),
        path,
        code: Some("IST0101"),
        message,
    }
}

impl Snapshot {
    /// The IST0101 findings of one VirtualService.
    pub(super) fn analyze_virtual_service(
        &self,
        r: &ObjectRef,
        vs: &IstioObject<VirtualServiceSpec>,
    ) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        let mut check = |path: String, d: &Destination| {
            let fqdn = resolve_host(&d.host, &vs.meta.namespace);
            if !self.services.contains_key(&fqdn) {
                out.push(warning(
                    &vs.origin,
                    r,
                    format!("{path}.host"),
                    format!("referenced host not found: {:?}", d.host),
                ));
            } else if let Some(subset) = &d.subset
                && !self.subsets_for(&fqdn, &vs.meta.namespace).contains(subset)
            {
                out.push(warning(
                    &vs.origin,
                    r,
                    format!("{path}.subset"),
                    format!("referenced host+subset in destinationrule not found: \"{fqdn}+{subset}\""),
                ));
            }
        };
        for (i, h) in vs.spec.http.iter().enumerate() {
            for (j, d) in h.route.iter().enumerate() {
                check(format!("spec.http[{i}].route[{j}].destination"), &d.destination);
            }
            if let Some(m) = &h.mirror {
                check(format!("spec.http[{i}].mirror"), m);
            }
            for (j, m) in h.mirrors.iter().enumerate() {
                check(format!("spec.http[{i}].mirrors[{j}].destination"), &m.destination);
            }
        }
        for (i, t) in vs.spec.tcp.iter().enumerate() {
            for (j, d) in t.route.iter().enumerate() {
                check(format!("spec.tcp[{i}].route[{j}].destination"), &d.destination);
            }
        }
        out
    }

    /// The IST0101 findings of one DestinationRule.
    pub(super) fn analyze_destination_rule(
        &self,
        r: &ObjectRef,
        dr: &IstioObject<DestinationRuleSpec>,
    ) -> Vec<Diagnostic> {
        let fqdn = resolve_host(&dr.spec.host, &dr.meta.namespace);
        if fqdn.starts_with('*') || self.services.contains_key(&fqdn) {
            return Vec::new();
        }
        vec![warning(&dr.origin, r, "spec.host".into(), format!("referenced host not found: {:?}", dr.spec.host))]
    }

    /// Re-checks one VirtualService or DestinationRule (dropping its findings if it is gone).
    pub(super) fn reanalyze(&mut self, r: &ObjectRef) {
        let found = if let Some(vs) = self.virtual_services.get(r) {
            self.analyze_virtual_service(r, vs)
        } else if let Some(dr) = self.destination_rules.get(r) {
            self.analyze_destination_rule(r, dr)
        } else {
            Vec::new()
        };
        if found.is_empty() {
            self.analysis.remove(r);
        } else {
            self.analysis.insert(r.clone(), found);
        }
    }

    /// Re-checks every VirtualService and DestinationRule.
    pub(super) fn reanalyze_all(&mut self) {
        let refs: Vec<ObjectRef> = self.virtual_services.keys().chain(self.destination_rules.keys()).cloned().collect();
        self.analysis = Default::default();
        for r in refs {
            self.reanalyze(&r);
        }
    }
}
