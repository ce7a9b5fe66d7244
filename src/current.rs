//! A value in force, swapped whole (the destinations and the ingress's
//! routing on a reload).

/// A value in force, swapped whole when the destinations are reloaded
/// (SIGHUP): readers take the `Arc` of the moment, cheaply.
#[derive(Debug)]
pub struct Current<T>(std::sync::RwLock<std::sync::Arc<T>>);

impl<T> Current<T> {
    pub fn new(value: T) -> Self {
        Self(std::sync::RwLock::new(std::sync::Arc::new(value)))
    }

    pub fn get(&self) -> std::sync::Arc<T> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The value in force, unless it is still `seen` (one read, no clone:
    /// the ingress asks this for every stored event).
    pub fn replaced(&self, seen: &std::sync::Arc<T>) -> Option<std::sync::Arc<T>> {
        let now = self.0.read().unwrap_or_else(|p| p.into_inner());
        (!std::sync::Arc::ptr_eq(&now, seen)).then(|| now.clone())
    }

    pub fn set(&self, value: T) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(value);
    }
}

#[cfg(test)]
mod tests {
    use super::Current;

    #[test]
    fn replaced_answers_only_after_a_set() {
        let c = Current::new(1);
        let seen = c.get();
        assert!(c.replaced(&seen).is_none());
        c.set(2);
        assert_eq!(c.replaced(&seen).as_deref(), Some(&2));
        assert!(c.replaced(&c.get()).is_none());
    }
}
