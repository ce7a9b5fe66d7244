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

    pub fn set(&self, value: T) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(value);
    }
}
