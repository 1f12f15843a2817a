# The exported CMake package: <libdir>/cmake/modelstate/modelstateConfig.cmake and friends, so
# that a downstream project writes find_package(modelstate) and links modelstate::client. The
# targets themselves are installed by their own directories into the export set
# modelstateTargets.
include(CMakePackageConfigHelpers)

set(MODELSTATE_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/modelstate)
install(EXPORT modelstateTargets
        NAMESPACE modelstate::
        DESTINATION ${MODELSTATE_CMAKE_DIR})
configure_package_config_file(
  ${CMAKE_CURRENT_LIST_DIR}/modelstateConfig.cmake.in
  ${PROJECT_BINARY_DIR}/modelstateConfig.cmake
  INSTALL_DESTINATION ${MODELSTATE_CMAKE_DIR})
# 0.x: a minor version may break the API.
write_basic_package_version_file(
  ${PROJECT_BINARY_DIR}/modelstateConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/modelstateConfig.cmake
              ${PROJECT_BINARY_DIR}/modelstateConfigVersion.cmake
        DESTINATION ${MODELSTATE_CMAKE_DIR})
