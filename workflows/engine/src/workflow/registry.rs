//! The workflow definitions a process knows (layer 5): several versions per kind.
use super::definition::Workflow;
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// The workflow definitions a process knows: several versions per kind.
#[derive(Debug, Clone, Default)]
pub struct WorkflowRegistry {
    kinds: HashMap<&'static str, BTreeMap<i32, Arc<Workflow>>>,
}

impl WorkflowRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a definition. Fails on an invalid definition or a (kind, version)
    /// registered twice.
    pub fn register(mut self, workflow: Workflow) -> Result<Self> {
        workflow.validate()?;
        let versions = self.kinds.entry(workflow.kind).or_default();
        if versions.contains_key(&workflow.version) {
            return Err(Error::Invalid(format!(
                "workflow {} v{} registered twice",
                workflow.kind, workflow.version
            )));
        }
        versions.insert(workflow.version, Arc::new(workflow));
        Ok(self)
    }

    /// The definition of `kind` at `version`.
    pub fn get(&self, kind: &str, version: i32) -> Option<&Arc<Workflow>> {
        self.kinds.get(kind)?.get(&version)
    }

    /// The newest definition of `kind`.
    pub fn latest(&self, kind: &str) -> Option<&Arc<Workflow>> {
        self.kinds.get(kind)?.values().next_back()
    }
}
