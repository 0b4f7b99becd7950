#include <torch/extension.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

// An AOTInductor package whose run lets go of Python's interpreter lock (torch's own binding keeps it).
struct Package {
  torch::inductor::AOTIModelPackageLoader loader;
  explicit Package(const std::string& path) : loader(path) {}
  std::vector<std::string> constant_fqns() { return loader.get_constant_fqns(); }
  void load_constants(std::unordered_map<std::string, at::Tensor> constants) {
    loader.load_constants(constants, /*use_inactive=*/false, /*check_full_update=*/true, /*user_managed=*/true);
  }
  std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs) {
    pybind11::gil_scoped_release release;
    return loader.run(inputs);
  }
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Package>(m, "Package")
      .def(pybind11::init<const std::string&>())
      .def("constant_fqns", &Package::constant_fqns)
      .def("load_constants", &Package::load_constants)
      .def("run", &Package::run);
}
